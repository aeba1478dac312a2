"""Real-world forms that strict parsing refused and that phones send: read them, forward
them in correct form, and keep refusing what is ambiguous (RFC 4475 stays as it says).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipwake.sip.endpoint import Endpoint, OptionsUser
from sipwake.sip.message import Request, Response, SipParseError, parse_message
from tests.sip.test_transport import read_message

TIMEOUT = 10


def options(from_: str = "<sip:alice@127.0.0.1>;tag=a1", body: str = "", port: int = 5999) -> str:
    extra = "Content-Type: text/plain\r\n" if body else ""
    return (
        "OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-len;rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: {from_}\r\n"
        "To: Zoë Ångström <sip:zoe@127.0.0.1>\r\n"
        "Call-ID: lenient@test\r\n"
        "CSeq: 1 OPTIONS\r\n"
        'Contact: Jörg Müller <sip:j@192.0.2.4>, "Q" <sip:q@192.0.2.5>\r\n'
        f"{extra}"
        f"Content-Length: {len(body.encode())}\r\n\r\n"
        f"{body}"
    )


def request(text: str | bytes) -> Request:
    msg = parse_message(text.encode() if isinstance(text, str) else text)
    assert isinstance(msg, Request)
    return msg


@pytest.mark.parametrize(
    ("from_", "display"),
    [
        ("Jörg Müller <sip:j@example.com>;tag=1", "Jörg Müller"),
        ("李小龍 <sip:lee@example.com>;tag=1", "李小龍"),
        ("John (Office) <sip:john@example.com>;tag=1", "John (Office)"),
        ("Smith & Co/Sales <sip:s@example.com>;tag=1", "Smith & Co/Sales"),
    ],
)
def test_unquoted_display_names_phones_send_are_read_and_kept_byte_exact(
    from_: str, display: str
) -> None:
    data = options(from_).encode()
    msg = request(data)
    assert msg.from_ is not None and msg.from_.display_name == display
    assert msg.from_.tag == "1"
    assert msg.to is not None and msg.to.display_name == "Zoë Ångström"
    assert [c.display_name for c in msg.contacts] == ["Jörg Müller", "Q"]
    assert msg.to_bytes() == data  # a valid message goes out as it came


def test_a_rebuilt_unquoted_display_name_is_written_quoted() -> None:
    msg = request(options("Jörg Müller <sip:j@example.com>;tag=1"))
    frm = msg.from_
    assert frm is not None
    frm.params["tag"] = "2"  # changed: written anew, in RFC 3261 form
    assert frm.to_string() == '"Jörg Müller" <sip:j@example.com>;tag=2'


@pytest.mark.parametrize(
    ("from_", "problem"),
    [
        # RFC 4475 3.1.2.15: a comma is a list separator, never part of a bare name.
        ("Bell, Alexander <sip:a.g.bell@bell-tel.com>;tag=43", "invalid From"),
        ('Mr. "J. <sip:j@example.com>;tag=1', "invalid From"),  # unbalanced quote
        ("Ann;x <sip:a@example.com>;tag=1", "invalid From"),
        ("Ann\x07Bell <sip:a@example.com>;tag=1", "invalid From"),  # control character
        ("a@b <sip:a@example.com>;tag=1", "invalid From"),
        ("sip:x <sip:a@example.com>;tag=1", "invalid From"),
    ],
)
def test_ambiguous_display_names_are_still_refused(from_: str, problem: str) -> None:
    with pytest.raises(SipParseError) as info:
        request(options(from_))
    assert info.value.status == 400 and problem in info.value.reason


def test_invalid_utf8_in_an_unquoted_display_name_is_refused() -> None:
    data = options().encode().replace(b"From: <sip", b"From: J\xf6rg <sip")  # Latin-1
    with pytest.raises(SipParseError) as info:
        request(data)
    assert info.value.status == 400 and "invalid From" in info.value.reason


def test_bare_lf_line_ends_are_read_and_rewritten_with_crlf() -> None:
    good = options(body="hello\r\n\r\nworld\n")
    head, _, body = good.partition("\r\n\r\n")
    lf = (head.replace("\r\n", "\n") + "\n\n" + body).encode()
    msg = request(lf)
    assert msg.call_id == "lenient@test"
    assert msg.cseq is not None and msg.cseq.method == "OPTIONS"
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bK-len"
    assert msg.body == b"hello\r\n\r\nworld\n"  # the body is never touched
    assert msg.to_bytes() == good.encode()  # forwarded in correct form


@pytest.mark.parametrize("blank", ["\n\n", "\r\n\n", "\n\r\n"])
def test_mixed_line_ends_end_the_head_at_the_first_empty_line(blank: str) -> None:
    good = options(body="v=0\r\n")
    head, _, body = good.partition("\r\n\r\n")
    lines = head.split("\r\n")
    mixed = "\r\n".join(lines[:3]) + "\n" + "\n".join(lines[3:]) + blank + body
    msg = request(mixed)
    assert msg.to_bytes() == good.encode()


def test_crlf_before_the_start_line_is_skipped() -> None:
    msg = request("\r\n\r\n" + options())
    assert msg.method == "OPTIONS" and msg.to_bytes() == options().encode()


def test_a_cr_that_ends_no_line_is_refused() -> None:
    data = options().replace("Call-ID: lenient@test\r\n", "Call-ID: a\rVia: x\n")
    lf = data.replace("\r\n", "\n")
    with pytest.raises(SipParseError) as info:
        request(lf)
    assert info.value.status == 400 and "CR without LF" in info.value.reason


def test_no_empty_line_at_all_is_still_refused() -> None:
    with pytest.raises(SipParseError) as info:
        request(options().replace("\r\n\r\n", "\r\n").replace("\r\n", "\n"))
    assert "no empty line after the header fields" in info.value.reason


# --- a bare LF inside a CRLF message: a line end for us as for the parsers behind us ----


def lf_reader(data: bytes) -> tuple[list[bytes], bytes]:
    """How a parser that splits at LF reads a message: its head lines, and the rest."""
    text = data.lstrip(b"\r\n")
    blank = re.search(rb"\n\r?\n", text)
    assert blank is not None
    head = text[: blank.start()]
    return [line.removesuffix(b"\r") for line in head.split(b"\n")], text[blank.end() :]


def test_a_bare_lf_inside_a_header_line_ends_that_line_and_is_forwarded_as_crlf() -> None:
    good = options()
    sneaky = good.replace("Call-ID: lenient@test\r\n", "Call-ID: lenient@test\nX-Extra: 1\r\n")
    msg = request(sneaky)
    assert msg.call_id == "lenient@test"  # not "lenient@test\nX-Extra: 1"
    assert msg.headers.get("X-Extra") == "1"  # a field of ours too
    out = msg.to_bytes()
    assert (
        out
        == good.replace(
            "Call-ID: lenient@test\r\n", "Call-ID: lenient@test\r\nX-Extra: 1\r\n"
        ).encode()
    )
    assert lf_reader(out)[0] == lf_reader(sneaky.encode())[0]


def test_a_field_smuggled_after_a_bare_lf_is_checked_like_any_other() -> None:
    sneaky = options().replace(
        "Call-ID: lenient@test\r\n", "Call-ID: lenient@test\nContent-Length: 9\r\n"
    )
    with pytest.raises(SipParseError) as info:
        request(sneaky)
    assert info.value.status == 400 and "multiple Content-Length values" in info.value.reason


def test_an_lf_empty_line_before_the_crlf_one_ends_the_head() -> None:
    good = options()
    early = good.replace("CSeq: 1 OPTIONS\r\n", "CSeq: 1 OPTIONS\n\n")
    msg = request(early)
    lines, rest = lf_reader(early.encode())
    assert msg.body == rest  # what follows the LF empty line is the body, for us too
    assert msg.headers.get("Contact") is None
    assert lf_reader(msg.to_bytes())[0] == [*lines, f"Content-Length: {len(rest)}".encode()]


def test_a_cr_inside_a_header_line_of_a_crlf_message_is_refused() -> None:
    sneaky = options().replace("Call-ID: lenient@test\r\n", "Call-ID: lenient@test\rX-Extra: 1\r\n")
    with pytest.raises(SipParseError) as info:
        request(sneaky)
    assert info.value.status == 400 and "CR without LF" in info.value.reason


INSERTS = [
    "\n",
    "\nX-Injected: 1",
    "\nVia: SIP/2.0/UDP 192.0.2.66;branch=z9hG4bK-evil",
    "\nContent-Length: 3",
    "\nCall-ID: other@test",
    "\n\n",
    "\r\n\n",
    "\n\r\n",
    "\n ",
    "\r",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_what_we_accept_is_read_alike_by_an_lf_splitting_parser(data: st.DataObject) -> None:
    text = options(body="hi\r\n\r\nthere\n\n").encode()
    head_len = text.index(b"\r\n\r\n")
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, head_len), st.sampled_from(INSERTS)), max_size=3)
    )
    for at, insert in sorted(edits, reverse=True):
        text = text[:at] + insert.encode() + text[at:]
    try:
        msg = parse_message(text)
    except SipParseError as exc:
        assert exc.status == 400 and exc.reason.startswith("Bad Request - ")
        return
    out = msg.to_bytes()
    head, _, _ = out.partition(b"\r\n\r\n")
    assert b"\r" not in head.replace(b"\r\n", b"") and b"\n" not in head.replace(b"\r\n", b"")
    ours = [(name.encode(), value.encode()) for _, name, value, _ in msg.headers._entries]
    theirs, _ = lf_reader(out)
    # The LF reader sees our start line and our fields (folded lines still folded).
    assert theirs[0] == out.split(b"\r\n", 1)[0]
    unfolded: list[tuple[bytes, bytes]] = []
    for line in theirs[1:]:
        if line[:1] in (b" ", b"\t"):
            name, value = unfolded[-1]
            unfolded[-1] = (name, (value + b" " + line.strip(b" \t")).strip(b" \t"))
        else:
            name, _, value = line.partition(b":")
            unfolded.append((name.rstrip(b" \t"), value.strip(b" \t")))
    assert unfolded == ours
    # Every field the sender meant for an LF reader is one of ours.
    sent, _ = lf_reader(text)
    assert set(sent[1:]) <= set(theirs[1:]) | {line for line in sent if line[:1] in (b" ", b"\t")}


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.queue.put_nowait(data)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(OptionsUser())
    yield ep
    await ep.close()


async def test_a_bare_lf_request_over_udp_is_answered_in_crlf(endpoint: Endpoint) -> None:
    port = await endpoint.listen("UDP", "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    try:
        own = int(udp.get_extra_info("sockname")[1])
        text = options("Jörg Müller <sip:j@127.0.0.1>;tag=a1", port=own)
        udp.sendto(text.replace("\r\n", "\n").encode(), ("127.0.0.1", port))
        data = await asyncio.wait_for(phone.queue.get(), TIMEOUT)
        assert b"\n" not in data.replace(b"\r\n", b"")  # every line ends in CRLF
        answer = parse_message(data)
        assert isinstance(answer, Response) and answer.status == 200
        assert answer.headers.get("From") == "Jörg Müller <sip:j@127.0.0.1>;tag=a1"
    finally:
        udp.close()


async def test_a_bare_lf_request_over_tcp_is_framed_and_the_stream_stays_aligned(
    endpoint: Endpoint,
) -> None:
    port = await endpoint.listen("TCP", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lf = options(body="hi\n").replace("\r\n", "\n").replace("UDP", "TCP")
        # Sent in two pieces: the framer waits for the LF-only empty line and the body.
        cut = lf.index("CSeq")
        writer.write(lf[:cut].encode())
        await writer.drain()
        writer.write(lf[cut:].encode())
        first = parse_message(await read_message(reader))
        assert isinstance(first, Response) and first.status == 200
        assert first.call_id == "lenient@test"
        # A CRLF request right behind it on the same connection is read as usual.
        crlf = options().replace("UDP", "TCP").replace("lenient@test", "second@test")
        writer.write(crlf.encode())
        second = parse_message(await read_message(reader))
        assert isinstance(second, Response) and second.call_id == "second@test"
    finally:
        writer.close()


async def test_a_field_after_a_bare_lf_in_a_crlf_request_over_udp_is_read_and_checked(
    endpoint: Endpoint,
) -> None:
    port = await endpoint.listen("UDP", "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    try:
        own = int(udp.get_extra_info("sockname")[1])
        good = options(port=own)
        smuggled = good.replace("Call-ID: lenient@test\r\n", "Call-ID: x\nContent-Length: 4\r\n")
        udp.sendto(smuggled.encode(), ("127.0.0.1", port))
        answer = parse_message(await asyncio.wait_for(phone.queue.get(), TIMEOUT))
        assert isinstance(answer, Response) and answer.status == 400
        assert "multiple Content-Length values" in answer.reason
        assert answer.call_id == "x"  # the Call-ID ends at the LF, for us as for the phone
        # The same bare LF before a harmless field: read as a line end, answered in CRLF.
        harmless = good.replace("Call-ID: lenient@test\r\n", "Call-ID: y\nX-Extra: 1\r\n")
        udp.sendto(harmless.encode(), ("127.0.0.1", port))
        data = await asyncio.wait_for(phone.queue.get(), TIMEOUT)
        assert b"\n" not in data.replace(b"\r\n", b"")
        ok = parse_message(data)
        assert isinstance(ok, Response) and ok.status == 200 and ok.call_id == "y"
    finally:
        udp.close()


async def test_bare_lf_heads_with_empty_lines_in_their_bodies_stay_framed_over_tcp(
    endpoint: Endpoint,
) -> None:
    port = await endpoint.listen("TCP", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        stream = b""
        for n, body in enumerate(["a\r\n\r\nb", "x\n\ny\r\n\r\n", ""]):
            text = options(body=body).replace("UDP", "TCP").replace("lenient@test", f"c{n}@t")
            head, _, rest = text.encode().partition(b"\r\n\r\n")
            stream += (head.replace(b"\r\n", b"\n") if n != 2 else head) + b"\n\n" + rest
        # All at once (the body's CRLFCRLF comes before any CRLFCRLF of a head), then the
        # same stream again one octet per write: the same three answers each time.
        for chunk in (len(stream), 1):
            for i in range(0, len(stream), chunk):
                writer.write(stream[i : i + chunk])
                await writer.drain()
            for n in range(3):
                answer = parse_message(await read_message(reader))
                assert isinstance(answer, Response) and answer.status == 200
                assert answer.call_id == f"c{n}@t"
    finally:
        writer.close()
