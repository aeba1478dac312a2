"""Stream framing over TCP/TLS: Content-Length delimiting, CRLF keep-alives, limits."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipwake.sip.framing import (
    PONG,
    FramerEvent,
    FramingError,
    KeepAlivePing,
    StreamFramer,
    is_keepalive,
)
from sipwake.sip.message import Request, Response


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"MESSAGE sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK{n}\r\n"
        f"Max-Forwards: 70\r\n"
        f"To: <sip:bob@example.com>\r\n"
        f"From: <sip:alice@example.com>;tag={n}\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {n} MESSAGE\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"\r\n"
    ).encode() + body


def call_ids(events: Sequence[object]) -> list[str | None]:
    return [e.call_id for e in events if isinstance(e, Request | Response)]


def test_several_messages_in_one_read() -> None:
    framer = StreamFramer()
    events = framer.feed(message(1, b"hello") + message(2) + message(3, b"\r\n\r\n"))
    assert call_ids(events) == ["call-1", "call-2", "call-3"]
    assert isinstance(events[0], Request) and events[0].body == b"hello"
    assert isinstance(events[2], Request) and events[2].body == b"\r\n\r\n"
    assert framer.buffered == 0


def test_message_split_across_reads_byte_by_byte() -> None:
    framer = StreamFramer()
    data = message(7, b"body with\r\n\r\ninside")
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    assert call_ids(events) == ["call-7"]
    assert isinstance(events[0], Request) and events[0].body == b"body with\r\n\r\ninside"


def test_double_crlf_is_a_ping_and_single_crlf_is_ignored() -> None:
    framer = StreamFramer()
    events = framer.feed(b"\r\n\r\n" + message(1) + b"\r\n" + message(2) + b"\r\n\r\n")
    assert [type(e) for e in events] == [KeepAlivePing, Request, Request, KeepAlivePing]
    assert PONG == b"\r\n"


def test_ping_split_across_reads() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [KeepAlivePing()]


def test_missing_content_length_on_a_stream_means_empty_body() -> None:
    data = message(1).replace(b"Content-Length: 0\r\n", b"")
    events = StreamFramer().feed(data + message(2))
    assert call_ids(events) == ["call-1", "call-2"]


def test_broken_message_with_good_framing_is_reported_and_the_stream_goes_on() -> None:
    broken = message(1).replace(b"CSeq: 1 MESSAGE", b"CSeq: 1 INVITE")
    framer = StreamFramer()
    events = framer.feed(broken + message(2))
    assert isinstance(events[0], FramingError) and not events[0].fatal
    assert events[0].error.status == 400 and "CSeq" in events[0].error.reason
    assert events[0].error.partial is not None
    assert call_ids(events) == ["call-2"]
    assert not framer.closed


def test_bad_content_length_is_fatal() -> None:
    framer = StreamFramer()
    events = framer.feed(message(1).replace(b"Content-Length: 0", b"Content-Length: -5"))
    assert len(events) == 1 and isinstance(events[0], FramingError)
    assert events[0].fatal and events[0].error.status == 400
    assert "Content-Length" in events[0].error.reason
    assert framer.closed
    assert framer.feed(message(2)) == []  # the owner must close the stream


def test_too_large_message_is_513_and_fatal() -> None:
    framer = StreamFramer(max_size=600)
    events = framer.feed(message(1, b"x" * 1000))
    assert len(events) == 1 and isinstance(events[0], FramingError)
    assert (events[0].error.status, events[0].fatal) == (513, True)


def test_endless_header_section_is_513_without_buffering_forever() -> None:
    framer = StreamFramer(max_size=1000)
    assert framer.feed(b"INVITE sip:a@b SIP/2.0\r\n") == []
    events = framer.feed(b"X-Junk: " + b"a" * 2000)
    assert len(events) == 1 and isinstance(events[0], FramingError)
    assert events[0].error.status == 513 and framer.buffered == 0


def test_broken_response_on_a_stream_is_marked_for_dropping() -> None:
    data = b"SIP/2.0 2000 OK\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    events = StreamFramer().feed(data)
    assert isinstance(events[0], FramingError) and events[0].error.is_response


def test_is_keepalive_for_datagrams() -> None:
    assert is_keepalive(b"\r\n\r\n") and is_keepalive(b"\r\n")
    assert not is_keepalive(b"") and not is_keepalive(message(1))


# --- the same messages however the stream is cut ------------------------------------------


def lf_head(data: bytes) -> bytes:
    """``data`` with bare-LF line ends in its head (the body is left as it is)."""
    head, _, body = data.partition(b"\r\n\r\n")
    return head.replace(b"\r\n", b"\n") + b"\n\n" + body


def mixed_head(data: bytes, blank: bytes) -> bytes:
    """Some lines of the head end in CRLF, the others in LF; the empty line is ``blank``."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return b"\r\n".join(lines[:3]) + b"\n" + b"\n".join(lines[3:]) + blank + body


def response(n: int, body: bytes = b"") -> bytes:
    return (
        f"SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK{n}\r\n"
        f"To: <sip:bob@example.com>;tag=b{n}\r\n"
        f"From: <sip:alice@example.com>;tag={n}\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {n} MESSAGE\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"\r\n"
    ).encode() + body


#: (bytes on the stream, Call-ID and body of the message it carries, or None for filler).
PIECES: list[tuple[bytes, tuple[str, bytes] | None]] = [
    (message(1, b"hello"), ("call-1", b"hello")),
    (message(2, b"a\r\n\r\nb\n\nc"), ("call-2", b"a\r\n\r\nb\n\nc")),
    (lf_head(message(3, b"a\r\n\r\nb")), ("call-3", b"a\r\n\r\nb")),
    (lf_head(message(4, b"x\n\ny\r\n\r\n")), ("call-4", b"x\n\ny\r\n\r\n")),
    (mixed_head(message(5, b"\r\n\r\n"), b"\r\n\n"), ("call-5", b"\r\n\r\n")),
    (mixed_head(message(6, b"\n\n"), b"\n\r\n"), ("call-6", b"\n\n")),
    (mixed_head(message(7, b"v=0\r\n\r\n"), b"\n\n"), ("call-7", b"v=0\r\n\r\n")),
    (lf_head(message(8)), ("call-8", b"")),
    (lf_head(response(9, b"\r\n\r\n\n\n")), ("call-9", b"\r\n\r\n\n\n")),
    (response(10, b"ok\n\n"), ("call-10", b"ok\n\n")),
    (b"\r\n\r\n", None),
    (b"\r\n", None),
    (b"\n", None),
]


def outcome(events: Sequence[object]) -> list[tuple[object, ...]]:
    """What a user of the framer sees: each message as serialised, pings, errors."""
    seen: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, Request | Response):
            seen.append(("message", e.to_bytes()))
        elif isinstance(e, FramingError):
            seen.append(("error", e.error.status, e.error.reason, e.fatal))
        else:
            seen.append(("ping",))
    return seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_way_of_cutting_the_stream_yields_the_same_messages(data: st.DataObject) -> None:
    pieces = data.draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=6))
    stream = b"".join(p for p, _ in pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=12)))
    one_read = StreamFramer()
    whole = one_read.feed(stream)
    # Fed whole, the stream gives the messages it was made of, bodies untouched.
    got = [(e.call_id, e.body) for e in whole if isinstance(e, Request | Response)]
    assert got == [m for _, m in pieces if m is not None]
    assert not any(isinstance(e, FramingError) for e in whole)
    framer = StreamFramer()
    events: list[FramerEvent] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += framer.feed(stream[start:end])
    assert outcome(events) == outcome(whole)
    assert framer.buffered == one_read.buffered  # e.g. a trailing CRLF, maybe half a ping
