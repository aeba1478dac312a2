"""Property tests: mutated SIP messages never break the parser, and serializing is stable.

Whatever bytes arrive, the parser raises only SipParseError; a message it accepts can be
serialized, parsed again and serialized to the same bytes; every parsed view of an
accepted message can be read (the parse-time syntax checks cover what the views parse).
"""

from __future__ import annotations

import csv
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipwake.sip.headers import NAME_ADDR_SYNTAX, VIA_SYNTAX, NameAddr, Via
from sipwake.sip.message import (
    FramingError,
    KeepAlivePing,
    Request,
    Response,
    SipParseError,
    StreamFramer,
    parse_message,
)
from sipwake.sip.uri import is_request_uri, parse_uri

CORPUS = Path("/work/shared/corpus/rfc4475")
PRID = "a1" * 32
SEEDS: list[bytes] = [
    (
        "REGISTER sip:sip.example.org SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 192.0.2.20:50312;alias;branch=z9hG4bK.Bh3rTn9cQ;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@sip.example.org>;tag=9xhWmqpE2\r\n"
        "To: sip:alice@sip.example.org\r\n"
        "Call-ID: 3Xc8-Pm4ZfR2\r\n"
        "CSeq: 21 REGISTER\r\n"
        "Contact: <sip:alice@192.0.2.20:50312;transport=tcp;pn-provider=apns.dev"
        f";pn-param=ABCD1234.org.linphone.phone.voip&remote;pn-prid={PRID}:voip&{PRID}:remote>"
        ';+sip.instance="<urn:uuid:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d>";reg-id=1\r\n'
        "Expires: 3600\r\n"
        "Supported: replaces, outbound\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode(),
    (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1;received=198.51.100.1;rport=5062\r\n"
        b'To: "Bob" <sip:bob@example.com>;tag=x\r\n'
        b"From: <sip:alice@example.com>;tag=y\r\n"
        b"Call-ID: c1\r\n"
        b"CSeq: 2 INVITE\r\n"
        b"Record-Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
        b"Content-Length: 4\r\n"
        b"\r\n"
        b"v=0\n"
    ),
]
if (CORPUS / "MANIFEST.tsv").exists():
    with (CORPUS / "MANIFEST.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["class"] == "valid":
                SEEDS.append((CORPUS / row["file"]).read_bytes())

# Octets that matter to the grammar, so mutations hit parser decisions often.
SPECIAL = b' \t\r\n:;,<>"\\%=@?&/[]*.-0123456789sipSIPtagbranch'


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["insert", "delete", "replace", "dup-line", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "insert":
            chunk = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=4),
                    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=4).map(bytes),
                    st.sampled_from(["²", "٣", "\u00a0", "é"]).map(str.encode),
                    st.just(b"9" * 5000),
                )
            )
            data[pos:pos] = chunk
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "replace" and data:
            data[pos] = draw(st.sampled_from(SPECIAL))
        elif kind == "dup-line":
            start = data.rfind(b"\r\n", 0, pos) + 2
            end = data.find(b"\r\n", pos)
            if 2 <= start < end:
                data[end:end] = data[start - 2 : end]
        else:
            del data[pos:]
    return bytes(data)


def read_every_view(msg: Request | Response) -> None:
    msg.via_list  # noqa: B018
    msg.from_  # noqa: B018
    msg.to  # noqa: B018
    msg.contacts  # noqa: B018
    msg.routes  # noqa: B018
    msg.record_routes  # noqa: B018
    msg.cseq  # noqa: B018
    msg.max_forwards  # noqa: B018
    msg.expires  # noqa: B018
    for value in msg.contacts:
        value.pn_params()
        value.to_string()
    if isinstance(msg, Request):
        msg.parsed_uri  # noqa: B018


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(mutated())
def test_parser_raises_only_its_own_error_and_serializing_is_stable(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        assert exc.status in (400, 505, 513)
        assert exc.reason
        return
    read_every_view(msg)
    once = msg.to_bytes()
    again = parse_message(once)
    read_every_view(again)
    assert again.to_bytes() == once


@SETTINGS
@given(mutated(), st.integers(1, 64))
def test_stream_framer_only_emits_events(data: bytes, chunk: int) -> None:
    framer = StreamFramer(max_size=4096)
    for i in range(0, len(data), chunk):
        for event in framer.feed(data[i : i + chunk]):
            assert isinstance(event, Request | Response | KeepAlivePing | FramingError)
            if isinstance(event, Request | Response):
                read_every_view(event)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError:
        return
    read_every_view(msg)


# Fragments that make up header values, so generated strings are often nearly valid.
PIECES = [
    "sip:", "sips:", "tel:", "urn:", "alice", "@", "example.com", "[2001:db8::1]", ":5060",
    ":99999", ";", "=", "tag", "lr", "transport=tcp", "?", "&", "<", ">", '"', "\\", " ",
    "\t", ",", "*", "Bob", "pn-prid", "x:y&z", "SIP/2.0/UDP", "/", "%41", "%", "+sip.instance",
    "é", "\x00",
]  # fmt: skip
value_text = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)


@settings(max_examples=1500, deadline=None)
@given(value_text)
def test_syntax_checks_are_never_looser_than_the_value_parsers(text: str) -> None:
    if NAME_ADDR_SYNTAX.match(text):
        NameAddr.parse(text).to_string()
    if VIA_SYNTAX.match(text):
        Via.parse(text).to_string()
    if is_request_uri(text):
        parse_uri(text).to_string()
