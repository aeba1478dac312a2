"""SIP messages: header container, parser limits and errors, serializer, views, responses."""

from __future__ import annotations

import pytest

from sipwake.sip.headers import CSeq, HeaderError, Headers, NameAddr, Via, split_list
from sipwake.sip.message import (
    REASON_PHRASES,
    Request,
    Response,
    SipParseError,
    make_response,
    parse_message,
)
from sipwake.sip.uri import SipUri

PRID = "9c" * 32
CONTACT = (
    "<sip:alice@192.0.2.20:50312;transport=tcp;pn-provider=apns.dev"
    ";pn-param=ABCD1234.org.linphone.phone.voip&remote"
    f";pn-prid={PRID}:voip&{PRID}:remote>"
    ';+sip.instance="<urn:uuid:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d>";reg-id=1;expires=600'
)
REGISTER = (
    "REGISTER sip:sip.example.org SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 192.0.2.20:50312;alias;branch=z9hG4bK.Bh3rTn9cQ;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@sip.example.org>;tag=9xhWmqpE2\r\n"
    "To: sip:alice@sip.example.org\r\n"
    "Call-ID: 3Xc8-Pm4ZfR2\r\n"
    "CSeq: 21 REGISTER\r\n"
    f"Contact: {CONTACT}\r\n"
    "Expires: 3600\r\n"
    "Supported: replaces, outbound, gruu\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
).encode()


def req(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


BASIC = req(
    "OPTIONS sip:bob@example.com SIP/2.0\n"
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776\n"
    "Max-Forwards: 70\n"
    "To: <sip:bob@example.com>\n"
    "From: Alice <sip:alice@example.com>;tag=1928\n"
    "Call-ID: a84b4c76e66710\n"
    "CSeq: 63104 OPTIONS\n"
    "Content-Length: 0\n"
    "\n"
)


# --- Headers ------------------------------------------------------------------------------


def test_headers_case_insensitive_and_compact_forms() -> None:
    h = Headers([("v", "SIP/2.0/UDP a"), ("VIA", "SIP/2.0/UDP b"), ("m", "<sip:x@y>")])
    assert h.get("Via") == "SIP/2.0/UDP a"
    assert h.get_all("via") == ["SIP/2.0/UDP a", "SIP/2.0/UDP b"]
    assert "contact" in h and "Contact" in h and "Route" not in h
    assert list(h) == [("v", "SIP/2.0/UDP a"), ("VIA", "SIP/2.0/UDP b"), ("m", "<sip:x@y>")]


def test_get_all_splits_list_fields_only_outside_quotes_and_brackets() -> None:
    h = Headers(
        [
            ("Contact", '"Doe, John" <sip:j@x;a=1,2>;q=0.5, <sip:k@y>'),
            ("Allow", "INVITE, ACK ,BYE"),
            ("Date", "Sat, 13 Nov 2010 23:29:00 GMT"),
        ]
    )
    assert h.get_all("Contact") == ['"Doe, John" <sip:j@x;a=1,2>;q=0.5', "<sip:k@y>"]
    assert h.get_all("Allow") == ["INVITE", "ACK", "BYE"]
    assert h.get_all("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]  # not a list field
    with pytest.raises(HeaderError):
        split_list('"unterminated, x')


def test_set_replaces_all_add_appends_remove_deletes() -> None:
    h = Headers([("Route", "<sip:a>"), ("To", "x"), ("Route", "<sip:b>")])
    h.set("route", "<sip:c>")
    assert list(h) == [("route", "<sip:c>"), ("To", "x")]
    h.add("Route", "<sip:d>")
    assert h.get_all("Route") == ["<sip:c>", "<sip:d>"]
    h.remove("ROUTE")
    assert list(h) == [("To", "x")]
    h.set("Max-Forwards", "70")
    assert h.get("max-forwards") == "70"


def test_remove_first_splits_a_combined_line() -> None:
    h = Headers([("Via", "SIP/2.0/UDP a, SIP/2.0/UDP b"), ("Via", "SIP/2.0/UDP c")])
    h.remove_first("via")
    assert h.get_all("via") == ["SIP/2.0/UDP b", "SIP/2.0/UDP c"]


def test_replace_first_is_remove_first_then_insert() -> None:
    for first in ("SIP/2.0/UDP a, SIP/2.0/UDP b", "SIP/2.0/UDP a"):
        items = [("To", "x"), ("v", first), ("Via", "SIP/2.0/UDP c")]
        h, expected = Headers(items), Headers(items)
        h.get_all("via")
        h._cache["via"] = ["stale"]
        h.replace_first("Via", "SIP/2.0/UDP new")
        expected.remove_first("Via")
        expected.insert(1, "Via", "SIP/2.0/UDP new")
        assert list(h) == list(expected)
        assert h.lines() == expected.lines()
        assert h._modified and "via" not in h._cache
    h = Headers([("To", "x")])
    h.replace_first("Via", "SIP/2.0/UDP new")
    assert list(h) == [("To", "x"), ("Via", "SIP/2.0/UDP new")]


def test_a_changed_field_forgets_only_its_own_parsed_view() -> None:
    """Rewriting the top Via (as the transport does for every request) keeps the parsed
    From, To, Contact and CSeq; a changed field is read again from its new text."""
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request)
    views = (msg.from_, msg.to, msg.contacts, msg.cseq)
    msg.headers.replace_first("Via", "SIP/2.0/TCP 192.0.2.20:50312;branch=z9hG4bK.x")
    assert (msg.from_, msg.to, msg.contacts, msg.cseq) == views
    assert msg.cseq is views[3] and msg.contacts is views[2]
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bK.x"
    msg.headers.set("To", "<sip:bob@sip.example.org>")
    msg.headers.add("m", "<sip:alice@192.0.2.21>")
    msg.headers.set("CSeq", "22 REGISTER")
    assert msg.to is not None and msg.to.uri.user == "bob"
    assert [str(c.uri) for c in msg.contacts][1] == "sip:alice@192.0.2.21"
    assert msg.cseq is not None and msg.cseq.number == 22
    assert msg.from_ is views[0]
    msg.headers.remove("From")
    assert msg.from_ is None


# --- parsing and serializing ---------------------------------------------------------------


def test_register_round_trips_byte_exact() -> None:
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request)
    assert msg.to_bytes() == REGISTER


def test_untouched_fields_keep_their_bytes_after_another_field_changes() -> None:
    data = req(
        "OPTIONS sip:bob@example.com SIP/2.0\n"
        "v :  SIP/2.0/UDP  host.example.com ;branch=z9hG4bK1\n"
        "X-Folded: one\n"
        "  two\n"
        "CSeq: 1 OPTIONS\n"
        "l: 0\n"
        "\n"
    )
    msg = parse_message(data)
    assert msg.headers.get("x-folded") == "one two"
    msg.headers.add("Record-Route", "<sip:proxy.example.com;lr>")
    out = msg.to_bytes()
    assert out.startswith(data[: data.index(b"l: 0")])
    assert b"Record-Route: <sip:proxy.example.com;lr>\r\n\r\n" in out


def test_to_bytes_sets_content_length_to_the_body() -> None:
    msg = Request("MESSAGE", "sip:bob@example.com")
    msg.headers.add("Content-Type", "text/plain")
    msg.body = b"hello"
    assert msg.to_bytes().endswith(b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    msg.body = b"hi"
    assert msg.to_bytes().endswith(b"Content-Length: 2\r\n\r\nhi")


def test_udp_trailing_octets_ignored_and_missing_length_takes_the_rest() -> None:
    with_length = BASIC.replace(b"Content-Length: 0", b"Content-Length: 3") + b"abcdef"
    assert parse_message(with_length).body == b"abc"
    without = BASIC.replace(b"Content-Length: 0\r\n", b"") + b"body!"
    assert parse_message(without).body == b"body!"


def test_response_parse_and_views() -> None:
    data = req(
        "SIP/2.0 180 Ringing\n"
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776;received=198.51.100.7;rport=6000\n"
        "To: <sip:bob@example.com>;tag=a6c85cf\n"
        "From: Alice <sip:alice@example.com>;tag=1928\n"
        "Call-ID: a84b4c76e66710\n"
        "CSeq: 314159 INVITE\n"
        "Content-Length: 0\n"
        "\n"
    )
    msg = parse_message(data)
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason, msg.version) == (180, "Ringing", "SIP/2.0")
    via = msg.top_via
    assert via is not None
    assert (via.received, via.rport, via.port) == ("198.51.100.7", "6000", 5060)
    assert msg.to is not None and msg.to.tag == "a6c85cf"
    assert msg.cseq == CSeq(314159, "INVITE")
    assert msg.to_bytes() == data


def test_message_views() -> None:
    msg = parse_message(REGISTER)
    assert msg.call_id == "3Xc8-Pm4ZfR2"
    assert msg.max_forwards == 70 and msg.expires == 3600
    via = msg.top_via
    assert via is not None
    assert (via.transport, via.host, via.port) == ("TCP", "192.0.2.20", 50312)
    assert via.branch == "z9hG4bK.Bh3rTn9cQ" and via.rport == "" and "alias" in via.params
    assert msg.from_ is not None and msg.from_.tag == "9xhWmqpE2"
    assert msg.to is not None and msg.to.tag is None
    assert msg.to.uri == SipUri.parse("sip:alice@sip.example.org")


def test_contact_push_params_readable_from_uri_and_header() -> None:
    contact = parse_message(REGISTER).contacts[0]
    assert contact.param("+sip.instance") == "<urn:uuid:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d>"
    assert contact.params["reg-id"] == "1" and contact.expires == 600
    assert contact.pn_params() == {
        "pn-provider": "apns.dev",
        "pn-param": "ABCD1234.org.linphone.phone.voip&remote",
        "pn-prid": f"{PRID}:voip&{PRID}:remote",
    }
    # Some clients put them in the header instead of the URI: both are read.
    header_form = NameAddr.parse('<sip:bob@192.0.2.9>;pn-provider=fcm;pn-prid="tok:en"')
    assert header_form.pn_params() == {"pn-provider": "fcm", "pn-prid": "tok:en"}


def test_contact_to_string_byte_exact_and_rebuilt_when_changed() -> None:
    contact = NameAddr.parse(CONTACT)
    assert contact.to_string() == CONTACT
    contact.params["expires"] = "0"
    assert contact.to_string() == CONTACT.replace("expires=600", "expires=0")


def test_wildcard_contact() -> None:
    data = BASIC.replace(b"Max-Forwards: 70", b"Contact: *\r\nExpires: 0\r\nMax-Forwards: 70")
    contacts = parse_message(data).contacts
    assert len(contacts) == 1 and contacts[0].is_wildcard


def test_name_addr_forms() -> None:
    quoted = NameAddr.parse('"A \\"B\\"" <sip:a@b>;tag=x')
    assert quoted.display_name == 'A "B"' and quoted.tag == "x"
    bare = NameAddr.parse("sip:a@b ;tag=y")
    assert bare.display_name is None and bare.tag == "y" and not bare.angle
    bare.tag = "z"
    assert bare.to_string() == "sip:a@b;tag=z"
    for bad in ["Bob, Jr <sip:a@b>", "<sip:a@b", '"open <sip:a@b>', "< sip:a@b>", "<sip:a@b>;;"]:
        with pytest.raises(HeaderError):
            NameAddr.parse(bad)


def test_via_build_and_parse() -> None:
    via = Via("udp", "192.0.2.1", 5060, {"branch": "z9hG4bKabc", "rport": None})
    assert via.to_string() == "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;rport"
    parsed = Via.parse(" SIP / 2.0 / TLS [2001:db8::1] : 5061 ; branch=z9hG4bKx ")
    assert (parsed.transport, parsed.host, parsed.port) == ("TLS", "[2001:db8::1]", 5061)


# --- errors ---------------------------------------------------------------------------------


def error_of(data: bytes, **kwargs: object) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse_message(data, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_too_large_is_513() -> None:
    err = error_of(BASIC, max_size=100)
    assert (err.status, err.reason, err.is_response) == (513, "Message Too Large", False)


def test_unknown_version_is_505_with_partial_request() -> None:
    err = error_of(BASIC.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    assert err.status == 505
    assert err.partial is not None and err.partial.call_id == "a84b4c76e66710"


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (b"Content-Length: 0", b"Content-Length: 10", "Content-Length larger than message"),
        (b"Content-Length: 0", b"Content-Length: -1", "negative Content-Length"),
        (b"Content-Length: 0", b"Content-Length: zero", "invalid Content-Length"),
        (b"Content-Length: 0", b"Content-Length: 0\r\nl: 0", "multiple Content-Length"),
        (b"CSeq: 63104 OPTIONS", b"CSeq: 63104 INVITE", "CSeq method"),
        (b"CSeq: 63104 OPTIONS", b"CSeq: 99999999999 OPTIONS", "CSeq"),
        (b"Max-Forwards: 70", b"Max-Forwards: 256", "Max-Forwards"),
        (b"To: <sip:bob@example.com>", b'To: "Bob <sip:bob@example.com>', "To"),
        (b"Call-ID: a84b4c76e66710", b"Call-ID a84b4c76e66710", "colon"),
        (b"Max-Forwards: 70", b"Max Forwards: 70", "header name"),
        (b"OPTIONS sip:bob@example.com", b"OPTIONS sip:bob@example.com?X=y", "Request-URI"),
    ],
)
def test_broken_request_is_400_naming_the_problem(old: bytes, new: bytes, words: str) -> None:
    err = error_of(BASIC.replace(old, new, 1))
    assert err.status == 400 and not err.is_response
    assert err.reason.startswith("Bad Request - ")
    assert words.lower() in err.reason.lower()
    assert err.partial is not None and err.partial.method == "OPTIONS"


@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, "+5", " "])
def test_numbers_must_be_ascii_digits(value: str) -> None:
    for field in ("Max-Forwards: 70", "Content-Length: 0"):
        name = field.split(":")[0]
        err = error_of(BASIC.replace(field.encode(), f"{name}: {value}".encode()))
        assert err.status == 400 and name in err.reason
    status = f"SIP/2.0 {value[:3]} OK\r\nCSeq: 1 INVITE\r\n\r\n".encode()
    assert error_of(status).is_response


def test_no_empty_line_is_400() -> None:
    err = error_of(BASIC[:-2])
    assert err.status == 400 and "empty line" in err.reason


def test_broken_response_is_marked_for_dropping() -> None:
    data = req("SIP/2.0 20 OK\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nCSeq: 1 INVITE\nl: 0\n\n")
    err = error_of(data)
    assert err.is_response and err.partial is None


# --- responses --------------------------------------------------------------------------------


def test_make_response_copies_dialog_fields_and_adds_the_to_tag() -> None:
    data = BASIC.replace(
        b"Max-Forwards: 70",
        b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp\r\nMax-Forwards: 70",
    )
    request = parse_message(data)
    assert isinstance(request, Request)
    resp = make_response(request, 200, to_tag="ab12")
    assert (resp.status, resp.reason) == (200, "OK")
    assert resp.headers.get_all("Via") == request.headers.get_all("Via")
    assert resp.to is not None and resp.to.tag == "ab12"
    assert resp.from_ is not None and resp.from_.tag == "1928"
    assert (resp.call_id, resp.cseq) == (request.call_id, request.cseq)
    assert "Max-Forwards" not in resp.headers
    wire = resp.to_bytes()
    assert wire.startswith(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776")
    assert wire.endswith(b"Content-Length: 0\r\n\r\n")
    assert isinstance(parse_message(wire), Response)


def test_make_response_keeps_an_existing_to_tag_and_knows_push_reasons() -> None:
    request = parse_message(
        BASIC.replace(b"<sip:bob@example.com>", b"<sip:bob@example.com>;tag=t1")
    )
    assert isinstance(request, Request)
    resp = make_response(request, 487, to_tag="new")
    assert resp.to is not None and resp.to.tag == "t1"
    assert make_response(request, 555).reason == "Push Notification Service Not Supported"
    assert make_response(request, 110).reason == "Push sent"
    assert make_response(request, 400, "Bad Request - Missing Call-ID").reason.endswith("Call-ID")
    assert all(code in REASON_PHRASES for code in (100, 180, 183, 202, 416, 420, 423, 513))


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("<sip:bob@example.com>", "<sip:bob@example.com>;tag=new"),
        ("sip:bob@example.com", "sip:bob@example.com;tag=new"),
        ('"Bob" <sip:bob@example.com>;x=1', '"Bob" <sip:bob@example.com>;x=1;tag=new'),
        # "tag" in the URI, not as a parameter: still no tag, one is added.
        ("<sip:tagger@example.com;tag=uri>", None),
        ("<sip:bob@example.com> ;TAG = t1", None),
    ],
)
def test_make_response_adds_a_to_tag_only_when_there_is_none(to: str, expected: str | None) -> None:
    request = parse_message(BASIC.replace(b"<sip:bob@example.com>", to.encode()))
    assert isinstance(request, Request)
    was = request.to
    assert was is not None
    resp = make_response(request, 200, to_tag="new")
    assert resp.to is not None
    assert resp.to.tag == (was.tag or "new")
    assert resp.to.uri == was.uri
    if expected is not None:
        assert resp.headers.get("To") == expected
    assert isinstance(parse_message(resp.to_bytes()), Response)


def test_push_contact_keeps_its_bytes_when_a_proxy_changes_other_fields() -> None:
    msg = parse_message(REGISTER)
    msg.headers.insert(0, "Via", "SIP/2.0/UDP proxy.example.org;branch=z9hG4bKp1")
    msg.headers.set("Max-Forwards", "69")
    out = msg.to_bytes()
    assert out.startswith(b"REGISTER sip:sip.example.org SIP/2.0\r\nVia: SIP/2.0/UDP proxy")
    assert f"\r\nContact: {CONTACT}\r\n".encode() in out
    assert b"\r\nMax-Forwards: 69\r\n" in out
    again = parse_message(out)
    assert again.contacts[0].pn_params() == parse_message(REGISTER).contacts[0].pn_params()
    assert len(again.via_list) == 2


def test_request_uri_view_follows_the_uri_text() -> None:
    msg = parse_message(BASIC)
    assert isinstance(msg, Request) and isinstance(msg.parsed_uri, SipUri)
    msg.uri = "tel:+15551234"
    assert msg.parsed_uri.scheme == "tel"
    assert msg.to_bytes().startswith(b"OPTIONS tel:+15551234 SIP/2.0\r\n")
