"""The str-method shortcuts of the parse-time syntax checks never accept what the regex refuses.

``name_addr_fast``/``via_fast``/``sip_uri_fast`` answer True only where NAME_ADDR_SYNTAX,
VIA_SYNTAX or the Request-URI regex match (False sends the value to the regex), and the
character tables of ``SipUri.parse`` agree with the regexes they replaced, character by
character. Generated values are built from near-valid pieces so both answers are common.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sipwake.sip.headers import (
    _HPARAM_RE,
    NAME_ADDR_SYNTAX,
    VIA_SYNTAX,
    CSeq,
    HeaderError,
    name_addr_fast,
    parse_header_params,
    via_fast,
)
from sipwake.sip.message import SipParseError, parse_message
from sipwake.sip.uri import (
    _BAD_URI_CHARS,
    _REQUEST_URI_RE,
    _URI_TEXT,
    HOST_TABLE,
    SIP_URI_TABLE,
    is_request_uri,
    only,
    port_fast,
    sip_uri_fast,
)

PRID = "a1" * 32
CONTACT = (
    "<sip:alice@192.0.2.20:50312;transport=tcp;pn-provider=apns.dev"
    f";pn-param=ABCD1234.org.linphone.phone.voip&remote;pn-prid={PRID}:voip&{PRID}:remote>"
    ';+sip.instance="<urn:uuid:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d>";reg-id=1'
)

SCHEMES = ["sip:", "sips:", "SiP:", "tel:", "sip", "sipx:", "urn:", ""]
USERS = ["", "alice@", "a;b=c@", "a:pw@", ":pw@", "a@b@", "é@", "a b@", "%41@", "a?b@", "a:@"]
HOSTS = ["example.com", "192.0.2.1", "[2001:db8::1]", "", "ex ample", "ex_am-ple.", "é", "a,b"]
PORTS = ["", ":5060", ":0", ":65535", ":65536", ":05060", ":", ":1a", ":99999", ":00001"]
URI_PARAMS = [";lr", ";transport=tcp", ";pn-prid=a:b&c", ";=x", ";x=", ";", ";a=b=c", ";a@b"]
URI_PARAMS += [";a?b", "?h=v", ";a<b", ";\x00", ";a\tb", ";a,b"]
HPARAMS = [";tag=1", ';+sip.instance="<urn:x>"', ';q="a\\"b"', ";x=", " ;tag=1", ";tag =1"]
HPARAMS += [";t@g=1", ';a="', ";a=b c", ";a=[::1]", ';a="x;y"', ";", ";;", ";a=?@$", ";a=<"]
HPARAMS += [';a="\r"', ';a=""', ";expires=3600", ";é=1", ",<sip:b@c>", ";a", ";a=b;"]
PROTOCOLS = ["SIP/2.0/UDP", "SIP/2.0/", "SIP//UDP", "/2.0/UDP", "SIP/2.0/UDP/x", "S@P/2.0/UDP"]
PROTOCOLS += ["SIP / 2.0 / UDP", "SIP/2.0/U\tDP", "sip/2.0/tcp", "SIP/2.0/UDP "]
SEPARATORS = [" ", "  ", "\t", "", " \t"]
ODD = list(" \t\r\n\x00\x7f\"'<>;:,@?=&%[]*/\\é\u00a0")


def _maybe_mutate(draw: st.DrawFn, text: str) -> str:
    for _ in range(draw(st.integers(0, 2))):
        pos = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:pos] + draw(st.sampled_from(ODD)) + text[pos:]
        else:
            text = text[:pos] + text[pos + 1 :]
    return text


@st.composite
def sip_uris(draw: st.DrawFn) -> str:
    return (
        draw(st.sampled_from(SCHEMES))
        + draw(st.sampled_from(USERS))
        + draw(st.sampled_from(HOSTS))
        + draw(st.sampled_from(PORTS))
        + "".join(draw(st.lists(st.sampled_from(URI_PARAMS), max_size=3)))
    )


@st.composite
def name_addrs(draw: st.DrawFn) -> str:
    uri = draw(sip_uris())
    head = draw(st.sampled_from(["<{}>", "{}", '"Bob" <{}>', "Bob <{}>", " <{}>", "<{}"]))
    params = "".join(draw(st.lists(st.sampled_from(HPARAMS), max_size=3)))
    return _maybe_mutate(draw, head.format(uri) + params)


@st.composite
def vias(draw: st.DrawFn) -> str:
    text = (
        draw(st.sampled_from(PROTOCOLS))
        + draw(st.sampled_from(SEPARATORS))
        + draw(st.sampled_from(HOSTS))
        + draw(st.sampled_from(PORTS))
        + "".join(draw(st.lists(st.sampled_from(HPARAMS), max_size=3)))
    )
    return _maybe_mutate(draw, text)


@settings(max_examples=3000, deadline=None)
@given(name_addrs())
def test_name_addr_shortcut_accepts_only_what_the_regex_accepts(value: str) -> None:
    if name_addr_fast(value):
        assert NAME_ADDR_SYNTAX.match(value) is not None
        assert value != "*"


@settings(max_examples=3000, deadline=None)
@given(vias())
def test_via_shortcut_accepts_only_what_the_regex_accepts(value: str) -> None:
    if via_fast(value):
        assert VIA_SYNTAX.match(value) is not None


@st.composite
def request_uris(draw: st.DrawFn) -> str:
    return _maybe_mutate(draw, draw(sip_uris()))


@settings(max_examples=2000, deadline=None)
@given(request_uris())
def test_request_uri_check_is_unchanged(uri: str) -> None:
    assert is_request_uri(uri) == (_REQUEST_URI_RE.match(uri) is not None)
    if uri.isascii() and sip_uri_fast(uri, SIP_URI_TABLE):
        assert _REQUEST_URI_RE.match(uri) is not None


def test_character_tables_agree_with_the_regexes_they_replace() -> None:
    host_re = re.compile(r"[A-Za-z0-9\-_.]+\Z")
    for code in range(128):
        ch = chr(code)
        assert only(ch, _URI_TEXT) == (_BAD_URI_CHARS.search(ch) is None), repr(ch)
        assert only(ch, HOST_TABLE) == (host_re.match(ch) is not None), repr(ch)
        assert only("ab" + ch + "cd", _URI_TEXT) == (_BAD_URI_CHARS.search(ch) is None)


@given(st.text(alphabet="0123456789a ", max_size=7))
def test_port_shortcut_accepts_only_ports_the_regex_accepts(text: str) -> None:
    port = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
    if port_fast(text):
        assert re.fullmatch(port, text)


def test_the_usual_values_take_the_shortcut() -> None:
    """The shapes phones send are decided without the regex (else the shortcut is dead)."""
    assert name_addr_fast(CONTACT)
    assert name_addr_fast("<sip:alice@example.com>;tag=9xhWmqpE2")
    assert name_addr_fast("sip:alice@sip.example.org")
    assert via_fast("SIP/2.0/UDP 192.0.2.1:5061;branch=z9hG4bK-1-2;rport")
    assert via_fast("SIP/2.0/TCP 192.0.2.20:50312;alias;branch=z9hG4bK.Bh3rTn9cQ;rport")
    assert is_request_uri("sip:sip.example.org") and sip_uri_fast("sip:a.b", SIP_URI_TABLE)


def test_values_the_shortcut_leaves_to_the_regex_are_still_refused() -> None:
    base = (
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n"
        "Call-ID: c\r\nCSeq: 1 REGISTER\r\nContact: {}\r\nContent-Length: 0\r\n\r\n"
    )
    for contact in (
        "<sip:a@example.com:65536>",
        "<sip:a@example.com:05060>",
        "<sip:a@b@example.com>",
        "<sip:a@example.com;=x>",
        "<sip:a@example.com>;tag=",
        '<sip:a@example.com>;a="x',
        "<sip:a@ex ample.com>",
        "<sip:@example.com>",
    ):
        try:
            parse_message(base.format(contact).encode())
        except SipParseError as exc:
            assert exc.status == 400 and "Contact" in exc.reason
        else:
            raise AssertionError(f"accepted {contact!r}")


def _cseq_by_regex(value: str) -> tuple[int, str] | str:
    m = re.compile(r"\s*([0-9]+)\s+([A-Za-z0-9\-.!%*_+`'~]+)\s*\Z").match(value)
    if m is None:
        return "malformed CSeq"
    if len(m.group(1)) > 10 or int(m.group(1)) > 2**31 - 1:
        return "CSeq number too large"
    return int(m.group(1)), m.group(2)


def _same_as_regex(value: str) -> None:
    try:
        cseq = CSeq.parse(value)
    except HeaderError as exc:
        assert str(exc) == _cseq_by_regex(value)
    else:
        assert (cseq.number, cseq.method) == _cseq_by_regex(value)


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=st.sampled_from("0129 \tREGISTERinvite-.!~;:٣é\u00a0"), max_size=16))
def test_cseq_shortcut_reads_as_the_regex(value: str) -> None:
    _same_as_regex(value)


def test_cseq_examples() -> None:
    for value in ("1 REGISTER", "2147483647 INVITE", "2147483648 INVITE", "00000000001 ACK"):
        _same_as_regex(value)


def _params_by_regex(text: str) -> dict[str, str | None] | str:
    params: dict[str, str | None] = {}
    pos = 0
    while pos < len(text):
        m = _HPARAM_RE.match(text, pos)
        if m is None:
            if text[pos:].strip():
                return "malformed"
            break
        params[m.group(1).lower()] = m.group(2)
        pos = m.end()
    return params


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([*HPARAMS, ";Tag=A", ";a=1;A=2", ';a="x y"', ";a=é"]), max_size=4))
def test_header_params_shortcut_reads_as_the_regex(items: list[str]) -> None:
    text = "".join(items)
    try:
        got: dict[str, str | None] | str = parse_header_params(text)
    except HeaderError:
        got = "malformed"
    assert got == _params_by_regex(text)
    if got != "malformed":
        assert list(got) == list(_params_by_regex(text))
