"""A sans-IO HTTP/2 server connection shared by the provider simulators.

Bytes go in (:meth:`Http2ServerConnection.receive_data`), complete requests come out,
responses go in (:meth:`respond`), bytes come out (:meth:`data_to_send`). No socket and no
clock here: the asyncio edge in each simulator moves bytes and decides when to answer.

Graceful GOAWAY (:meth:`goaway`): from the call on, streams above ``last_stream_id`` are
dropped unprocessed; the GOAWAY frame itself is sent once every stream up to
``last_stream_id`` has been answered. Sending it later is allowed (RFC 9113 section 6.8)
and matters in practice: h2-based clients, like h2 itself, stop reading responses once they
have seen a GOAWAY. The frame is built by hand because h2's ``close_connection`` forbids
sending anything afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

# Largest request body kept; longer bodies are counted but not stored (the simulators
# answer 413 on size long before this).
MAX_KEPT_BODY = 64 * 1024


class Http2ProtocolError(Exception):
    """The peer broke HTTP/2; the connection must be closed (a GOAWAY is queued)."""


def _text(value: bytes | str) -> str:
    """Header bytes as text; invalid UTF-8 becomes U+FFFD, so validation refuses it
    instead of the decoder raising."""
    if isinstance(value, str):
        return value
    return value.decode("utf-8", errors="replace")


@dataclass(slots=True)
class Http2Request:
    """One complete request: headers in arrival order (pseudo-headers included), body."""

    stream_id: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_size: int = 0

    def header(self, name: str) -> str | None:
        """The first value of ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_count(self, name: str) -> int:
        return sum(1 for k, _ in self.headers if k == name)


@dataclass(slots=True)
class _Partial:
    headers: list[tuple[str, str]]
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class Http2ServerConnection:
    """Server side of one HTTP/2 connection, request/response level."""

    def __init__(self, max_concurrent_streams: int = 1000) -> None:
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True
        )
        self._conn = h2.connection.H2Connection(config=config)
        self._out = bytearray()
        self._partial: dict[int, _Partial] = {}
        self._pending_body: dict[int, bytearray] = {}
        self.goaway_last_stream_id: int | None = None
        self.open_streams: set[int] = set()  # streams accepted and not yet answered
        self.terminated = False  # the peer sent GOAWAY or the connection broke
        self._goaway_frame: GoAwayFrame | None = None
        self.last_complete_stream_id = 0  # highest stream whose request was handed out
        self.goaway_sent = False
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams
            },
        )
        self._conn.initiate_connection()
        self._flush_h2()

    def _flush_h2(self) -> None:
        self._out += self._conn.data_to_send()

    def data_to_send(self) -> bytes:
        """Bytes to write to the transport, in order."""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def draining(self) -> bool:
        """GOAWAY was sent: no new stream will be processed."""
        return self.goaway_last_stream_id is not None

    @property
    def finished(self) -> bool:
        """Nothing is left to answer after a GOAWAY: the transport may be closed."""
        return self.terminated or (self.goaway_sent and not self.open_streams)

    def receive_data(self, data: bytes) -> list[Http2Request]:
        """Feed bytes from the peer; return the requests completed by them."""
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(h2.errors.ErrorCodes.PROTOCOL_ERROR)
            raise Http2ProtocolError(str(exc)) from exc
        done: list[Http2Request] = []
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                sid = ev.stream_id
                if self._ignored(sid):
                    continue
                headers = [(_text(k), _text(v)) for k, v in ev.headers or []]
                self._partial[sid] = _Partial(headers)
                self.open_streams.add(sid)
            elif isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id
                if ev.flow_controlled_length:
                    self._conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                part = self._partial.get(sid)
                if part is not None and ev.data:
                    part.size += len(ev.data)
                    if part.size <= MAX_KEPT_BODY:
                        part.chunks.append(ev.data)
            elif isinstance(ev, h2.events.StreamEnded):
                part = self._partial.pop(ev.stream_id, None)
                if part is not None:
                    self.last_complete_stream_id = max(self.last_complete_stream_id, ev.stream_id)
                    body = b"".join(part.chunks)
                    done.append(Http2Request(ev.stream_id, part.headers, body, part.size))
            elif isinstance(ev, h2.events.StreamReset):
                self._partial.pop(ev.stream_id, None)
                self._pending_body.pop(ev.stream_id, None)
                self.open_streams.discard(ev.stream_id)
                self._maybe_send_goaway()
            elif isinstance(ev, h2.events.WindowUpdated):
                self._send_pending()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated = True
        self._flush_h2()
        return done

    def _ignored(self, stream_id: int) -> bool:
        last = self.goaway_last_stream_id
        return last is not None and stream_id > last

    def respond(
        self, stream_id: int, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Answer a stream; silently skipped if the peer reset it meanwhile."""
        if stream_id not in self.open_streams:
            return
        all_headers = [(":status", str(status)), *headers]
        if body:
            all_headers.append(("content-length", str(len(body))))
        try:
            self._conn.send_headers(stream_id, all_headers, end_stream=not body)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.open_streams.discard(stream_id)
            return
        if body:
            self._pending_body[stream_id] = bytearray(body)
            self._send_pending()
        else:
            self.open_streams.discard(stream_id)
        self._flush_h2()
        self._maybe_send_goaway()

    def _send_pending(self) -> None:
        """Send queued response bodies as far as flow control allows."""
        for sid in list(self._pending_body):
            buf = self._pending_body[sid]
            try:
                while buf:
                    window = self._conn.local_flow_control_window(sid)
                    size = min(window, self._conn.max_outbound_frame_size, len(buf))
                    if size <= 0:
                        break
                    self._conn.send_data(sid, bytes(buf[:size]))
                    del buf[:size]
                if not buf:
                    self._conn.end_stream(sid)
                    del self._pending_body[sid]
                    self.open_streams.discard(sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._pending_body.pop(sid, None)
                self.open_streams.discard(sid)
        self._flush_h2()
        self._maybe_send_goaway()

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        """Graceful GOAWAY: streams above ``last_stream_id`` are never processed; the frame
        goes out once the streams up to it are answered (at once with ``now``)."""
        if self.goaway_last_stream_id is not None:
            return
        self.goaway_last_stream_id = last_stream_id
        for sid in [s for s in self._partial if s > last_stream_id]:
            del self._partial[sid]
        self.open_streams = {s for s in self.open_streams if s <= last_stream_id}
        self._goaway_frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=last_stream_id,
            error_code=error_code,
            additional_data=debug,
        )
        self._maybe_send_goaway()

    def goaway_now(self) -> None:
        """Send a pending GOAWAY frame without waiting for open streams (shutdown)."""
        self._maybe_send_goaway(force=True)

    def _maybe_send_goaway(self, force: bool = False) -> None:
        frame = self._goaway_frame
        if frame is None or (self.open_streams and not force):
            return
        self._flush_h2()
        self._out += frame.serialize()
        self._goaway_frame = None
        self.goaway_sent = True

    def _fail(self, code: h2.errors.ErrorCodes) -> None:
        """Connection error: GOAWAY naming the last request handed out (never a stream
        that was not processed), then the caller closes."""
        self.terminated = True
        last = self.last_complete_stream_id
        if self.goaway_last_stream_id is not None:
            last = min(last, self.goaway_last_stream_id)
        try:
            self._conn.close_connection(error_code=code, last_stream_id=last)
        except h2.exceptions.ProtocolError:
            return
        self._flush_h2()

    @property
    def highest_stream_id(self) -> int:
        """The highest stream id the peer has opened."""
        return int(self._conn.highest_inbound_stream_id)
