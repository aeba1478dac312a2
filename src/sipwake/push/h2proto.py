"""Sans-IO HTTP/2 client connection (RFC 9113): bytes in, events out.

Only what a push client needs: client-initiated request streams with whole responses,
SETTINGS, flow control in both directions, PING (answering, keep-alive and dead-peer
detection driven by a clock object), GOAWAY and RST_STREAM. Frames are built and parsed
by hand because the general-purpose ``h2`` state machine costs more CPU per request than
a push gateway can afford (see docs/benchmarks.md). No sockets here: the asyncio edge is
in :mod:`sipwake.push.http2`.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from sipwake.clock import Clock
from sipwake.push.hpack import HpackDecoder, HpackEncoder, HpackError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

ERROR_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_MAX_FRAME = 16_384
# Until the server's SETTINGS say otherwise we assume this many concurrent streams
# (RFC 9113 recommends servers allow at least 100).
INITIAL_STREAM_LIMIT = 100

_FRAME_HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_PACK_HEADER = _FRAME_HEADER.pack
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"error 0x{code:x}")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialized frame (also used by tests to play the server)."""
    return _PACK_HEADER((len(payload) << 8) | ftype, flags, stream_id) + payload


# --- events -------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponseReceived:
    """A whole response (headers and body) arrived on ``stream_id``."""

    stream_id: int
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class StreamReset:
    """The server reset ``stream_id``; REFUSED_STREAM means it did not process it."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class GoAwayReceived:
    """The server will not process streams above ``last_stream_id``.

    ``unprocessed`` lists our streams above it; they are forgotten by the connection and
    may be re-sent elsewhere (RFC 9113 §6.8).
    """

    last_stream_id: int
    error_code: int
    debug_data: bytes
    unprocessed: list[int]


@dataclass(slots=True)
class SettingsReceived:
    """The server's SETTINGS were applied (the first ones make the connection ready)."""

    settings: dict[int, int]


@dataclass(slots=True)
class PingAcked:
    opaque: bytes
    rtt: float


@dataclass(slots=True)
class PingReceived:
    opaque: bytes


@dataclass(slots=True)
class ConnectionTerminated:
    """The connection is unusable (protocol error or keep-alive timeout); close it."""

    error_code: int
    reason: str


Event = (
    ResponseReceived
    | StreamReset
    | GoAwayReceived
    | SettingsReceived
    | PingAcked
    | PingReceived
    | ConnectionTerminated
)


class ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class _Stream:
    __slots__ = (
        "blocked",
        "body",
        "headers",
        "id",
        "local_closed",
        "pending",
        "recv_unacked",
        "send_window",
        "status",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.pending: memoryview | None = None  # request body not yet sent
        self.blocked = False  # queued in the connection's list of streams awaiting window
        self.local_closed = False
        self.status = 0
        self.headers: dict[str, str] | None = None
        self.body: list[bytes] = []
        self.recv_unacked = 0


class H2ClientConnection:
    """The client side of one HTTP/2 connection.

    Feed received bytes to :meth:`receive_data`, send what :meth:`data_to_send` returns,
    and call :meth:`tick` when :meth:`next_deadline` (in ``clock.monotonic()`` seconds)
    is reached.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        ping_interval: float = 60.0,
        ping_timeout: float = 10.0,
        receive_window: int = 16 * 1024 * 1024,
        connection_window: int = 64 * 1024 * 1024,
    ) -> None:
        self._clock = clock
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._out = bytearray()
        self._in = bytearray()
        self._encoder = HpackEncoder()
        self._decoder = HpackDecoder()
        self._streams: dict[int, _Stream] = {}
        self._blocked: deque[_Stream] = deque()  # streams waiting for send window
        self._next_id = 1
        self.closed = False
        self.goaway_received = False
        self.ready = False  # set by the server's first SETTINGS
        self.max_concurrent = INITIAL_STREAM_LIMIT
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._send_window = DEFAULT_WINDOW
        self._recv_window = receive_window
        self._conn_recv_window = connection_window
        self._conn_recv_unacked = 0
        self._header_buf: bytearray | None = None  # HEADERS awaiting CONTINUATION
        self._header_stream = 0
        self._header_end_stream = False
        self._last_recv = clock.monotonic()
        self._ping_sent_at: float | None = None
        self._ping_wait = ping_timeout  # how long the PING in flight may go unanswered
        self._ping_opaque = b""
        self._ping_counter = 0

    # --- outbound -------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface: magic, our SETTINGS, a wide connection window."""
        settings = b"".join(
            (
                _SETTING.pack(SETTINGS_ENABLE_PUSH, 0),
                _SETTING.pack(SETTINGS_INITIAL_WINDOW_SIZE, self._recv_window),
                _SETTING.pack(SETTINGS_MAX_HEADER_LIST_SIZE, 65_536),
            )
        )
        self._out += PREFACE
        self._out += frame(SETTINGS, 0, 0, settings)
        if self._conn_recv_window > DEFAULT_WINDOW:
            increment = self._conn_recv_window - DEFAULT_WINDOW
            self._out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def available_streams(self) -> int:
        """How many more requests may start now (0 once GOAWAY came or ids ran out)."""
        if self.closed or self.goaway_received or self._next_id > MAX_STREAM_ID:
            return 0
        return self.max_concurrent - len(self._streams)

    def send_request(self, headers: Sequence[tuple[str, str]], body: bytes = b"") -> int:
        """Open a stream carrying one request; returns its id."""
        if self.available_streams <= 0:
            raise RuntimeError("no stream available on this connection")
        sid = self._next_id
        self._next_id += 2
        stream = _Stream(sid, self._peer_initial_window)
        self._streams[sid] = stream
        block = self._encoder.encode(headers)
        flags = FLAG_END_HEADERS if body else FLAG_END_HEADERS | FLAG_END_STREAM
        out = self._out
        max_frame = self._peer_max_frame
        if len(block) <= max_frame:
            out += _PACK_HEADER((len(block) << 8) | HEADERS, flags, sid)
            out += block
        else:
            chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
            out += frame(HEADERS, flags & ~FLAG_END_HEADERS, sid, chunks[0])
            for i, chunk in enumerate(chunks[1:], start=2):
                last = FLAG_END_HEADERS if i == len(chunks) else 0
                out += frame(CONTINUATION, last, sid, chunk)
        if body:
            n = len(body)
            if n <= self._send_window and n <= stream.send_window and n <= max_frame:
                out += _PACK_HEADER((n << 8) | DATA, FLAG_END_STREAM, sid)
                out += body
                self._send_window -= n
                stream.send_window -= n
                stream.local_closed = True
            else:
                stream.pending = memoryview(body)
                self._send_pending(stream)
        else:
            stream.local_closed = True
        return sid

    def _send_pending(self, stream: _Stream) -> None:
        """Send as much of the stream's body as the windows allow; park it otherwise."""
        data = stream.pending
        assert data is not None
        while data:
            n = min(len(data), self._send_window, stream.send_window, self._peer_max_frame)
            if n <= 0:
                if not stream.blocked:
                    stream.blocked = True
                    self._blocked.append(stream)
                stream.pending = data
                return
            last = n == len(data)
            self._out += _PACK_HEADER((n << 8) | DATA, FLAG_END_STREAM if last else 0, stream.id)
            self._out += data[:n]
            self._send_window -= n
            stream.send_window -= n
            data = data[n:]
        stream.pending = None
        stream.local_closed = True

    def _unblock(self) -> None:
        for _ in range(len(self._blocked)):
            stream = self._blocked.popleft()
            stream.blocked = False
            if stream.pending is not None and self._streams.get(stream.id) is stream:
                self._send_pending(stream)
            if self._send_window <= 0:
                break  # the rest stay queued, in order

    def reset_stream(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abandon a stream (for example on a request timeout) and free its slot."""
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._out += frame(RST_STREAM, 0, stream_id, _U32.pack(error_code))

    def send_ping(self) -> bytes:
        """Send a PING; its ACK comes back as :class:`PingAcked`."""
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(8, "big")
        self._ping_opaque = opaque
        self._ping_sent_at = self._clock.monotonic()
        self._ping_wait = self.ping_timeout
        self._out += frame(PING, 0, 0, opaque)
        return opaque

    def probe(self, timeout: float) -> None:
        """Check liveness now: a PING that must be answered within ``timeout`` seconds
        (an outstanding PING's deadline is shortened instead), else :meth:`tick` ends the
        connection. Call :meth:`next_deadline` again afterwards."""
        if self.closed:
            return
        if self._ping_sent_at is None:
            self.send_ping()
            self._ping_wait = timeout
        else:
            now = self._clock.monotonic()
            self._ping_wait = min(self._ping_wait, now - self._ping_sent_at + timeout)

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY and stop accepting requests."""
        if not self.closed:
            self.closed = True
            payload = _GOAWAY.pack(0, error_code) + reason.encode()
            self._out += frame(GOAWAY, 0, 0, payload)

    # --- timers ---------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When :meth:`tick` must next run (``clock.monotonic()`` seconds)."""
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self._ping_wait
        return self._last_recv + self.ping_interval

    def tick(self) -> list[Event]:
        """Keep-alive: PING after ``ping_interval`` of silence; give up after no ACK."""
        if self.closed:
            return []
        now = self._clock.monotonic()
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self._ping_wait:
                self.close(NO_ERROR, "ping timeout")
                return [ConnectionTerminated(NO_ERROR, "no PING answer from the server")]
        elif now >= self._last_recv + self.ping_interval:
            self.send_ping()
        return []

    # --- inbound --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse received bytes; returns the events they complete."""
        events: list[Event] = []
        if self.closed:
            return events
        self._last_recv = self._clock.monotonic()
        buf = self._in
        buf += data
        pos = 0
        end = len(buf)
        unpack = _FRAME_HEADER.unpack_from
        try:
            while end - pos >= 9:
                lt, flags, sid = unpack(buf, pos)
                length = lt >> 8
                if length > DEFAULT_MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} octets")
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                ftype = lt & 0xFF
                sid &= 0x7FFFFFFF
                if self._header_buf is not None and ftype != CONTINUATION:
                    raise ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
                if ftype == HEADERS:
                    self._on_headers(flags, sid, payload, events)
                elif ftype == DATA:
                    self._on_data(flags, sid, payload, events)
                elif ftype == SETTINGS:
                    self._on_settings(flags, sid, payload, events)
                elif ftype == WINDOW_UPDATE:
                    self._on_window_update(sid, payload)
                elif ftype == PING:
                    self._on_ping(flags, sid, payload, events)
                elif ftype == RST_STREAM:
                    if len(payload) != 4 or sid == 0:
                        raise ProtocolError(FRAME_SIZE_ERROR, "bad RST_STREAM")
                    if self._streams.pop(sid, None) is not None:
                        events.append(StreamReset(sid, _U32.unpack(payload)[0]))
                elif ftype == GOAWAY:
                    self._on_goaway(payload, events)
                elif ftype == CONTINUATION:
                    self._on_continuation(flags, sid, payload, events)
                elif ftype == PUSH_PROMISE:
                    raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE while push is disabled")
                # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5).
        except ProtocolError as exc:
            self.close(exc.code, str(exc))
            self._in.clear()
            events.append(ConnectionTerminated(exc.code, str(exc)))
            return events
        if pos:
            del buf[:pos]
        return events

    def _on_headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & (FLAG_PADDED | FLAG_PRIORITY):
            start = 0
            pad = 0
            if flags & FLAG_PADDED:
                pad = payload[0] if payload else 256
                start = 1
            if flags & FLAG_PRIORITY:
                start += 5
            if start + pad > len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding longer than HEADERS")
            payload = payload[start : len(payload) - pad]
        if not flags & FLAG_END_HEADERS:
            self._header_buf = bytearray(payload)
            self._header_stream = sid
            self._header_end_stream = bool(flags & FLAG_END_STREAM)
            return
        self._on_header_block(sid, payload, bool(flags & FLAG_END_STREAM), events)

    def _on_continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if self._header_buf is None or sid != self._header_stream:
            raise ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._header_buf += payload
        if flags & FLAG_END_HEADERS:
            block = bytes(self._header_buf)
            self._header_buf = None
            self._on_header_block(sid, block, self._header_end_stream, events)

    def _on_header_block(self, sid: int, block: bytes, end: bool, events: list[Event]) -> None:
        try:
            fields = self._decoder.decode(block)  # always, to keep the table in step
        except HpackError as exc:
            raise ProtocolError(COMPRESSION_ERROR, str(exc)) from None
        stream = self._streams.get(sid)
        if stream is None:
            return  # a stream we reset; its answer no longer matters
        if stream.headers is None:
            status = 0
            headers: dict[str, str] = {}
            for name, value in fields:
                if name[0] == ":":
                    if name == ":status":
                        # isdigit() alone admits "²" and other non-ASCII digits
                        status = int(value) if value.isascii() and value.isdigit() else 0
                else:
                    headers[name] = value
            if not 100 <= status <= 999:
                self._stream_error(sid, PROTOCOL_ERROR, events)
                return
            if status < 200:
                if end:
                    self._stream_error(sid, PROTOCOL_ERROR, events)
                return  # informational answer: the final one follows
            stream.status = status
            stream.headers = headers
        else:  # trailers
            if not end:
                self._stream_error(sid, PROTOCOL_ERROR, events)
                return
            for name, value in fields:
                if name[0] != ":":
                    stream.headers[name] = value
        if end:
            self._finish(stream, events)

    def _finish(self, stream: _Stream, events: list[Event]) -> None:
        del self._streams[stream.id]
        if not stream.local_closed:
            # The server answered before reading the whole body; stop sending it.
            stream.pending = None
            self._out += frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR))
        assert stream.headers is not None
        body = b"".join(stream.body) if stream.body else b""
        events.append(ResponseReceived(stream.id, stream.status, stream.headers, body))

    def _stream_error(self, sid: int, code: int, events: list[Event]) -> None:
        self._streams.pop(sid, None)
        self._out += frame(RST_STREAM, 0, sid, _U32.pack(code))
        events.append(StreamReset(sid, code))

    def _on_data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        flow_len = len(payload)
        if flags & FLAG_PADDED:
            pad = payload[0] if payload else 256
            if pad + 1 > len(payload):
                raise ProtocolError(PROTOCOL_ERROR, "padding longer than DATA")
            payload = payload[1 : len(payload) - pad]
        if flow_len:
            self._conn_recv_unacked += flow_len
            if self._conn_recv_unacked * 2 >= self._conn_recv_window:
                self._out += frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._conn_recv_unacked))
                self._conn_recv_unacked = 0
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.headers is None:
            self._stream_error(sid, PROTOCOL_ERROR, events)
            return
        if payload:
            stream.body.append(payload)
        if flags & FLAG_END_STREAM:
            self._finish(stream, events)
        elif flow_len:
            stream.recv_unacked += flow_len
            if stream.recv_unacked * 2 >= self._recv_window:
                self._out += frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.recv_unacked))
                stream.recv_unacked = 0

    def _on_settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changes: dict[int, int] = {}
        for off in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, off)
            changes[ident] = value
            if ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_concurrent = value
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 16_777_215:
                    raise ProtocolError(PROTOCOL_ERROR, f"bad SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
            elif ident == SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.set_max_table_size(value)
        self._out += frame(SETTINGS, FLAG_ACK, 0)
        self.ready = True
        self._unblock()
        events.append(SettingsReceived(changes))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if increment == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        else:
            stream = self._streams.get(sid)
            if stream is None:
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW or increment == 0:
                self._streams.pop(sid, None)
                self._out += frame(RST_STREAM, 0, sid, _U32.pack(FLOW_CONTROL_ERROR))
                return
        if self._blocked:
            self._unblock()

    def _on_ping(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid != 0 or len(payload) != 8:
            raise ProtocolError(PROTOCOL_ERROR, "bad PING")
        if flags & FLAG_ACK:
            if self._ping_sent_at is not None and payload == self._ping_opaque:
                rtt = self._clock.monotonic() - self._ping_sent_at
                self._ping_sent_at = None
                events.append(PingAcked(payload, rtt))
            return
        self._out += frame(PING, FLAG_ACK, 0, payload)
        events.append(PingReceived(payload))

    def _on_goaway(self, payload: bytes, events: list[Event]) -> None:
        if len(payload) < 8:
            raise ProtocolError(FRAME_SIZE_ERROR, "short GOAWAY")
        last_id, code = _GOAWAY.unpack_from(payload)
        last_id &= 0x7FFFFFFF
        self.goaway_received = True
        unprocessed = sorted(sid for sid in self._streams if sid > last_id)
        for sid in unprocessed:
            del self._streams[sid]
        events.append(GoAwayReceived(last_id, code, payload[8:], unprocessed))
