"""RFC 4475 torture messages: each file is handled the way its RFC section asks.

Valid messages parse with the fields a server relies on; invalid requests raise a
SipParseError with the status to answer and a reason naming the problem (plus the partial
request needed to answer); invalid responses are marked to be dropped; transaction,
semantic and compat messages parse and expose what the upper layers decide on.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

from sipwake.sip.message import (
    FramingError,
    Request,
    Response,
    SipParseError,
    StreamFramer,
    parse_message,
)
from sipwake.sip.uri import AbsoluteUri, SipUri

CORPUS = Path("/work/shared/corpus/rfc4475")
if not CORPUS.is_dir():  # the corpus also ships next to the tests
    CORPUS = Path(__file__).parent / "rfc4475"

MANIFEST = (
    list(csv.DictReader((CORPUS / "MANIFEST.tsv").open(), delimiter="\t"))
    if (CORPUS / "MANIFEST.tsv").exists()
    else []
)
pytestmark = pytest.mark.skipif(not MANIFEST, reason="RFC 4475 corpus not available")


def load(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def request(name: str) -> Request:
    msg = parse_message(load(name))
    assert isinstance(msg, Request)
    return msg


def response(name: str) -> Response:
    msg = parse_message(load(name))
    assert isinstance(msg, Response)
    return msg


# --- valid (3.1.1.x) ---------------------------------------------------------------------


def check_wsinv() -> None:
    m = request("wsinv.dat")
    assert m.method == "INVITE"
    assert isinstance(m.parsed_uri, SipUri) and m.parsed_uri.params == {"unknownparam": None}
    assert m.to is not None and m.to.tag == "1918181833n"
    assert m.from_ is not None and m.from_.display_name == 'J Rosenberg \\"'
    assert m.from_.tag == "98asjd8"
    assert m.max_forwards == 68
    assert m.cseq is not None and (m.cseq.number, m.cseq.method) == (9, "INVITE")
    vias = [(v.transport, v.host, v.branch) for v in m.via_list]
    assert vias == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert m.headers.get("Subject") == ""
    assert m.headers.get("newfangledheader") == "newfangled value continued newfangled value"
    assert m.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert "lr" in m.routes[0].uri.params  # type: ignore[union-attr]
    contact = m.contacts[0]
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert len(m.body) == 150


def check_intmeth() -> None:
    m = request("intmeth.dat")
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert m.cseq is not None and m.cseq.method == m.method
    uri = m.parsed_uri
    assert isinstance(uri, SipUri) and uri.host == "example.com"
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert m.to is not None and m.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_ is not None and m.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.from_.param("fromParam''~+*_!.-%") == "работающий"
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def check_esc01() -> None:
    m = request("esc01.dat")
    uri = m.parsed_uri
    assert isinstance(uri, SipUri)
    assert (uri.user, uri.host) == ("sips:user@example.com", "example.net")
    assert m.to is not None and m.to.uri == SipUri.parse("sip:user@example.com")
    assert m.from_ is not None and isinstance(m.from_.uri, SipUri)
    assert m.from_.uri.user == "I have spaces"
    assert m.headers.get("Content-Type") == "application/sdp"  # compact "C"
    contact = m.contacts[0].uri
    assert contact == SipUri.parse("sip:caller@host5.example.net;lr;name=value%25%34%31")


def check_escnull() -> None:
    m = request("escnull.dat")
    assert m.to is not None and isinstance(m.to.uri, SipUri)
    assert m.to.uri.user == "null-\x00-null"
    assert [c.uri.user for c in m.contacts] == ["\x00", "\x00\x00"]  # type: ignore[union-attr]


def check_esc02() -> None:
    m = request("esc02.dat")
    assert m.method == "RE%47IST%45R"  # a method is a token: not unescaped
    assert m.to is not None and m.to.display_name == "%Z%45"
    assert m.top_via is not None and m.top_via.branch == "z9hG4bK209%fzsnel234"
    assert [str(c.uri) for c in m.contacts] == [
        "sip:alias1@host1.example.com",
        "sip:alias3@host3.example.com",
    ]
    assert m.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"  # another field


def check_lwsdisp() -> None:
    m = request("lwsdisp.dat")
    assert m.from_ is not None and m.from_.display_name == "caller"
    assert m.from_.tag == "323"


def check_longreq() -> None:
    m = request("longreq.dat")
    assert len(m.via_list) == 34
    assert m.via_list[0].host == "sip33.example.com"
    assert m.via_list[-1].received == "192.0.2.5"
    assert m.to is not None and m.to.display_name is not None
    assert len(m.to.display_name) > 100
    assert m.call_id is not None and len(m.call_id) > 100
    assert len(m.body) == 150


def check_dblreq() -> None:
    data = load("dblreq.dat")
    m = request("dblreq.dat")
    assert m.body == b""  # the second message in the datagram is ignored
    assert m.to_bytes() == data[: data.index(b"\r\n\r\n") + 4]


def check_semiuri() -> None:
    m = request("semiuri.dat")
    uri = m.parsed_uri
    assert isinstance(uri, SipUri)
    assert (uri.user, uri.host, uri.params) == ("user;par=u@example.net", "example.com", {})
    assert len(m.headers.get_all("Accept")) == 6


def check_transports() -> None:
    m = request("transports.dat")
    assert [v.transport for v in m.via_list] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def check_mpart01() -> None:
    m = request("mpart01.dat")
    assert m.method == "MESSAGE"
    assert len(m.body) == 553
    assert m.headers.get("Content-Type") == "multipart/mixed;boundary=7a9cbec02ceef655"
    assert m.headers.get("y") == m.headers.get("Identity")
    assert m.top_via is not None and m.top_via.rport == ""


def check_unreason() -> None:
    m = response("unreason.dat")
    assert m.status == 200
    assert m.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"


def check_noreason() -> None:
    m = response("noreason.dat")
    assert (m.status, m.reason) == (100, "")
    assert m.to_bytes() == load("noreason.dat")


# --- invalid (3.1.2.x) -------------------------------------------------------------------


def rejected(name: str, status: int, *words: str) -> Callable[[], None]:
    """The request is refused with ``status``; the reason names the problem."""

    def check() -> None:
        with pytest.raises(SipParseError) as info:
            parse_message(load(name))
        err = info.value
        assert err.status == status and not err.is_response
        for word in words:
            assert word.lower() in err.reason.lower()
        # The top of the request was readable: a server can build its 400 from it.
        assert err.partial is not None and err.partial.call_id
        assert err.partial.headers.get("via") is not None

    return check


def dropped(name: str) -> Callable[[], None]:
    def check() -> None:
        with pytest.raises(SipParseError) as info:
            parse_message(load(name))
        assert info.value.is_response and info.value.partial is None

    return check


# --- transaction, semantic, compat (3.2, 3.3, 3.4) ---------------------------------------


def check_badbranch() -> None:
    m = request("badbranch.dat")
    # Only the magic cookie: not an RFC 3261 branch, so transactions fall back to 2543 rules.
    assert m.top_via is not None and m.top_via.branch == "z9hG4bK"


def check_insuf() -> None:
    m = request("insuf.dat")
    assert m.missing_headers() == ["to", "from", "call-id", "max-forwards"]


def check_unkscm() -> None:
    uri = request("unkscm.dat").parsed_uri
    assert isinstance(uri, AbsoluteUri) and uri.scheme == "nobodyknowsthisscheme"


def check_novelsc() -> None:
    uri = request("novelsc.dat").parsed_uri
    assert isinstance(uri, AbsoluteUri) and uri.scheme == "soap.beep"


def check_unksm2() -> None:
    m = request("unksm2.dat")
    assert m.to is not None and m.to.uri.scheme == "isbn"
    assert m.from_ is not None and m.from_.uri.scheme == "http" and m.from_.tag == "3234233"
    assert [c.uri.scheme for c in m.contacts] == ["name"]


def check_bext01() -> None:
    m = request("bext01.dat")
    assert m.headers.get_all("Require") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    assert m.headers.get_all("Proxy-Require") == [
        "noProxiesSupportThis",
        "norDoAnyProxiesSupportThis",
    ]


def check_invut() -> None:
    m = request("invut.dat")
    assert m.headers.get("Content-Type") == "application/unknownformat"
    assert len(m.body) == 40


def check_regaut01() -> None:
    m = request("regaut01.dat")
    assert m.headers.get("Authorization") == "NoOneKnowsThisScheme opaque-data=here"


def check_multi01() -> None:
    m = request("multi01.dat")
    assert m.repeated_single_headers() == ["cseq", "call-id", "to", "from", "max-forwards"]


def check_bcast() -> None:
    m = response("bcast.dat")
    assert m.status == 200
    assert [v.host for v in m.via_list] == ["192.0.2.198", "255.255.255.255"]


def check_zeromf() -> None:
    assert request("zeromf.dat").max_forwards == 0


def check_cparam01() -> None:
    c = request("cparam01.dat").contacts[0]
    # addr-spec form: the parameter belongs to the header field, not the URI
    assert isinstance(c.uri, SipUri) and c.uri.params == {}
    assert c.params == {"unknownparam": None}
    assert c.uri.user == "+19725552222"


def check_cparam02() -> None:
    c = request("cparam02.dat").contacts[0]
    assert isinstance(c.uri, SipUri) and c.uri.params == {"unknownparam": None}
    assert c.params == {}


def check_regescrt() -> None:
    c = request("regescrt.dat").contacts[0]
    assert isinstance(c.uri, SipUri)
    assert c.uri.headers == {"Route": "%3Csip:sip.example.com%3E"}
    assert str(c.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"


def check_sdp01() -> None:
    assert request("sdp01.dat").headers.get("Accept") == "text/nobodyKnowsThis"


def check_inv2543() -> None:
    m = request("inv2543.dat")
    assert m.top_via is not None and m.top_via.branch is None
    assert m.to is not None and m.to.params == {"user": "phone"}
    assert isinstance(m.from_, object) and m.from_ is not None
    assert m.from_.uri.params == {"user": "phone"}  # type: ignore[union-attr]
    assert m.record_routes[0].uri.params == {"maddr": "ss1.example.com"}  # type: ignore[union-attr]
    assert m.body.startswith(b"v=0")  # no Content-Length over UDP: the rest is the body


EXPECTED: dict[str, Callable[[], None]] = {
    "wsinv.dat": check_wsinv,
    "intmeth.dat": check_intmeth,
    "esc01.dat": check_esc01,
    "escnull.dat": check_escnull,
    "esc02.dat": check_esc02,
    "lwsdisp.dat": check_lwsdisp,
    "longreq.dat": check_longreq,
    "dblreq.dat": check_dblreq,
    "semiuri.dat": check_semiuri,
    "transports.dat": check_transports,
    "mpart01.dat": check_mpart01,
    "unreason.dat": check_unreason,
    "noreason.dat": check_noreason,
    "badinv01.dat": rejected("badinv01.dat", 400, "Via"),
    "clerr.dat": rejected("clerr.dat", 400, "Content-Length larger than message"),
    "ncl.dat": rejected("ncl.dat", 400, "negative Content-Length"),
    "scalar02.dat": rejected("scalar02.dat", 400, "CSeq"),
    "scalarlg.dat": dropped("scalarlg.dat"),
    "quotbal.dat": rejected("quotbal.dat", 400, "To", "quoted"),
    "ltgtruri.dat": rejected("ltgtruri.dat", 400, "Request-URI"),
    "lwsruri.dat": rejected("lwsruri.dat", 400, "Request-Line"),
    "lwsstart.dat": rejected("lwsstart.dat", 400, "Request-Line"),
    "trws.dat": rejected("trws.dat", 400, "Request-Line"),
    "escruri.dat": rejected("escruri.dat", 400, "Request-URI", "header"),
    "baddate.dat": rejected("baddate.dat", 400, "Date"),
    "regbadct.dat": rejected("regbadct.dat", 400, "Contact", "<>"),
    "badaspec.dat": rejected("badaspec.dat", 400, "To", "addr-spec"),
    "baddn.dat": rejected("baddn.dat", 400, "From", "display name"),
    "badvers.dat": rejected("badvers.dat", 505, "Version"),
    "mismatch01.dat": rejected("mismatch01.dat", 400, "CSeq"),
    # RFC 4475 §3.1.2.18 prefers 501 but accepts 400: the parser cannot know the methods.
    "mismatch02.dat": rejected("mismatch02.dat", 400, "CSeq"),
    "bigcode.dat": dropped("bigcode.dat"),
    "badbranch.dat": check_badbranch,
    "insuf.dat": check_insuf,
    "unkscm.dat": check_unkscm,
    "novelsc.dat": check_novelsc,
    "unksm2.dat": check_unksm2,
    "bext01.dat": check_bext01,
    "invut.dat": check_invut,
    "regaut01.dat": check_regaut01,
    "multi01.dat": check_multi01,
    "mcl01.dat": rejected("mcl01.dat", 400, "multiple Content-Length"),
    "bcast.dat": check_bcast,
    "zeromf.dat": check_zeromf,
    "cparam01.dat": check_cparam01,
    "cparam02.dat": check_cparam02,
    "regescrt.dat": check_regescrt,
    "sdp01.dat": check_sdp01,
    "inv2543.dat": check_inv2543,
}


def test_every_corpus_message_has_an_expectation() -> None:
    assert {row["file"] for row in MANIFEST} == set(EXPECTED)


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_message_handled_as_its_section_says(row: dict[str, str]) -> None:
    EXPECTED[row["file"]]()


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_accepted_message_round_trips_and_exposes_its_views(row: dict[str, str]) -> None:
    data = load(row["file"])
    try:
        msg = parse_message(data)
    except SipParseError:
        assert row["class"] in ("invalid", "semantic")
        return
    assert row["class"] != "invalid"
    # every parsed view can be read on a message the parser accepted
    for attr in ("via_list", "from_", "to", "contacts", "routes", "record_routes", "cseq"):
        getattr(msg, attr)
    if isinstance(msg, Request):
        msg.parsed_uri  # noqa: B018
    had_length = msg.headers.get("content-length") is not None
    out = msg.to_bytes()
    if had_length:
        assert data.startswith(out)  # byte-exact (minus ignored trailing octets)
    again = parse_message(out)
    assert again.to_bytes() == out


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"] for r in MANIFEST])
def test_stream_framer_survives_the_message_fed_byte_by_byte(row: dict[str, str]) -> None:
    data = load(row["file"])
    framer = StreamFramer()
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    for event in events:
        assert isinstance(event, Request | Response | FramingError)
    if row["class"] == "valid" and row["file"] != "dblreq.dat":
        assert isinstance(events[0], Request | Response)
