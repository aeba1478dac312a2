"""The HTTP/2 client under every push provider: long-lived, multiplexed, loss-free.

One :class:`Http2Client` serves one origin over up to ``max_connections`` connections.
It waits for the server's SETTINGS before opening streams, never exceeds the server's
MAX_CONCURRENT_STREAMS (excess requests wait in a FIFO queue), keeps idle connections alive
with PINGs and drops those whose PINGs go unanswered. Requests the server provably did not
process (above a GOAWAY's last stream id, or reset with REFUSED_STREAM) are re-sent on a
fresh connection; a request that may have been processed is never re-sent silently: it
fails with :class:`Http2Error`. When a sent request times out, its connection takes no new
request until a PING sent then is answered; unanswered within ``probe_timeout``, the
connection is dropped and requests go to a fresh one. The protocol logic is sans-IO in
:mod:`sipwake.push.h2proto`; this module is the asyncio edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from sipwake.clock import Clock, SystemClock
from sipwake.push import h2proto
from sipwake.push.h2proto import (
    ConnectionTerminated,
    GoAwayReceived,
    H2ClientConnection,
    PingAcked,
    ResponseReceived,
    SettingsReceived,
    StreamReset,
)

log = logging.getLogger(__name__)

# How often one request may be re-sent after the server refused it unprocessed
# (REFUSED_STREAM, or above a GOAWAY's last stream id).
MAX_RESENDS = 3
# After an in-flight request times out, a PING must be answered within this many seconds
# or the connection is dropped, so later requests go to a fresh one.
PROBE_TIMEOUT = 3.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
# Headers HTTP/2 forbids (RFC 9113 §8.2.2); a caller passing one gets a ValueError.
_CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}
)


@dataclass(frozen=True, slots=True)
class Http2Response:
    status: int
    headers: dict[str, str]  # lower-case names; pseudo-headers excluded
    body: bytes


class Http2Error(Exception):
    """The request failed at the HTTP/2 or network level.

    ``maybe_processed`` is False only when the server provably never acted on the request
    (never sent, refused with REFUSED_STREAM or above a GOAWAY's last stream id): only
    then may a caller send it again without risking a double push.
    """

    maybe_processed = True

    def __init__(self, message: str, *, maybe_processed: bool | None = None) -> None:
        super().__init__(message)
        if maybe_processed is not None:
            self.maybe_processed = maybe_processed


class Http2Timeout(Http2Error):
    """No answer within the request timeout."""


class Http2QueueTimeout(Http2Timeout):
    """The request timed out before it was sent: the server never saw it."""

    maybe_processed = False


class Http2ConnectError(Http2Error):
    """Could not connect, or the TLS handshake or ALPN negotiation failed."""

    maybe_processed = False


class _Request:
    __slots__ = (
        "body",
        "deadline",
        "future",
        "headers",
        "resends",
        "stream_id",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        headers: list[tuple[str, str]],
        body: bytes,
        future: asyncio.Future[Http2Response],
    ) -> None:
        self.headers = headers
        self.body = body
        self.future = future
        self.resends = 0
        self.stream_id = 0
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0  # loop.time() past which the request is never sent
        self.timeout = 0.0  # seconds, for messages


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: feeds the sans-IO protocol and resolves request futures."""

    def __init__(self, client: Http2Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.proto = H2ClientConnection(
            client._clock,
            ping_interval=client.ping_interval,
            ping_timeout=min(client.ping_interval, 20.0),
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Request] = {}
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.lost = False
        self._flush_pending = False
        self._unflushed: list[_Request] = []  # sent to the protocol, not yet to the socket
        self._keepalive: asyncio.TimerHandle | None = None
        self.answered = False  # a response arrived on this connection
        self.probing = False  # a request timed out: no new ones until the PING is answered

    # asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            selected = ssl_object.selected_alpn_protocol()
            if selected != "h2":
                self._fail_ready(
                    Http2ConnectError(
                        f"{self.client.origin} did not select HTTP/2 by ALPN "
                        f"(selected: {selected or 'nothing'})"
                    )
                )
                transport.abort()
                return
        self.proto.initiate()
        self.flush()
        self._arm_keepalive()

    def data_received(self, data: bytes) -> None:
        events = self.proto.receive_data(data)
        if events:
            self._handle(events)
        self.client._pump()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        reason = f"connection to {self.client.origin} lost" + (f": {exc}" if exc else "")
        self._fail_ready(Http2ConnectError(reason))
        streams, self.streams = self.streams, {}
        # Requests whose frames never reached the socket cannot have been processed.
        unsent = [r for r in self._unflushed if streams.pop(r.stream_id, None) is r]
        self._unflushed = []
        for req in streams.values():
            self.client._fail(req, Http2Error(reason + " before the answer"))
        self.client._connection_gone(self)
        if unsent:
            self.client._requeue(unsent)

    # helpers ----------------------------------------------------------------------------

    def _fail_ready(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved by the connector; avoid "never retrieved"

    def flush(self) -> None:
        transport = self.transport
        if transport is not None and not self.lost and not transport.is_closing():
            data = self.proto.data_to_send()
            if data:
                transport.write(data)
            if self._unflushed:
                self._unflushed.clear()

    def _deferred_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def schedule_flush(self) -> None:
        """Write once per event-loop iteration: many requests share one send()."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._deferred_flush)

    @property
    def usable(self) -> bool:
        return (
            self.ready.done()
            and not self.lost
            and not self.probing
            and self.proto.available_streams > 0
        )

    def send(self, req: _Request) -> None:
        req.stream_id = sid = self.proto.send_request(req.headers, req.body)
        self.streams[sid] = req
        self._unflushed.append(req)
        self.schedule_flush()

    def cancel(self, req: _Request) -> None:
        if self.streams.pop(req.stream_id, None) is not None:
            self.proto.reset_stream(req.stream_id)
            self.schedule_flush()

    def close(self) -> None:
        self.proto.close()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def probe(self) -> None:
        """A request timed out here: PING now; no answer within the probe timeout drops
        the connection, so a dead one stops taking requests in seconds, not minutes."""
        if self.lost or self.proto.closed:
            return
        self.probing = True
        self.proto.probe(self.client.probe_timeout)
        self.schedule_flush()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        delay = self.proto.next_deadline() - self.client._clock.monotonic()
        self._keepalive = self.loop.call_later(max(delay, 0.0), self._on_keepalive)

    def _on_keepalive(self) -> None:
        if self.lost:
            return
        events = self.proto.tick()
        if events:
            self._handle(events)
        self.flush()
        if not self.lost and not self.proto.closed:
            self._arm_keepalive()

    def _handle(self, events: list[h2proto.Event]) -> None:
        client = self.client
        for ev in events:
            if type(ev) is ResponseReceived:
                if not self.answered:  # the server works: reconnect at once next time
                    self.answered = True
                    client._backoff = 0.0
                req = self.streams.pop(ev.stream_id, None)
                if req is not None:
                    client._resolve(req, Http2Response(ev.status, ev.headers, ev.body))
            elif isinstance(ev, StreamReset):
                req = self.streams.pop(ev.stream_id, None)
                if req is None:
                    continue
                if ev.error_code == h2proto.REFUSED_STREAM and req.resends < MAX_RESENDS:
                    req.resends += 1
                    client._requeue([req])
                else:
                    client._fail(
                        req,
                        Http2Error(
                            f"stream reset by server: {h2proto.error_name(ev.error_code)}",
                            maybe_processed=ev.error_code != h2proto.REFUSED_STREAM,
                        ),
                    )
            elif type(ev) is PingAcked:
                self.probing = False  # alive: it takes new requests again
            elif isinstance(ev, SettingsReceived):
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(ev, GoAwayReceived):
                log.info(
                    "GOAWAY from %s (%s, last stream %d); re-sending %d unprocessed request(s)",
                    client.origin,
                    h2proto.error_name(ev.error_code),
                    ev.last_stream_id,
                    len(ev.unprocessed),
                )
                again = [self.streams.pop(sid) for sid in ev.unprocessed if sid in self.streams]
                if self.answered or ev.last_stream_id:
                    # A server draining a connection that did work: not counted.
                    client._requeue(again)
                else:
                    # GOAWAY before the server took or answered anything: the next
                    # connection waits (growing backoff), and a request may be refused
                    # this way only so often.
                    client._backoff = min(max(client._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
                    resend = []
                    for req in again:
                        if req.resends < MAX_RESENDS:
                            req.resends += 1
                            resend.append(req)
                        else:
                            client._fail(
                                req,
                                Http2Error(
                                    f"{client.origin} refused the request unprocessed "
                                    f"{MAX_RESENDS + 1} times (GOAWAY); not sent again",
                                    maybe_processed=False,
                                ),
                            )
                    client._requeue(resend)
                client._retire(self)
                if not self.streams:
                    self.close()
            elif isinstance(ev, ConnectionTerminated):
                log.warning("closing connection to %s: %s", client.origin, ev.reason)
                client._retire(self)
                self.flush()
                if self.transport is not None:
                    self.transport.close()
        if self.proto.goaway_received and not self.streams and not self.lost:
            self.close()


class Http2Client:
    """Long-lived HTTP/2 connection(s) to one origin (https://host:port).

    ``ssl_context`` (CA, client certificate) is the caller's; its ALPN list is set to
    ``h2``. ``http://`` URLs speak h2c with prior knowledge. Timers other than the
    per-request timeouts run on ``clock`` through the sans-IO connection.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 1,
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        ping_interval: float = 60.0,
        probe_timeout: float = PROBE_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(
                f"base_url must be https://host[:port] or http://host[:port]: {base_url!r}"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"base_url must not have a path or query: {base_url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.scheme = parts.scheme
        self.host = parts.hostname
        default_port = 443 if self.scheme == "https" else 80
        self.port = parts.port or default_port
        host_text = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host_text if self.port == default_port else f"{host_text}:{self.port}"
        self.origin = f"{self.scheme}://{self.authority}"
        if self.scheme == "https":
            if ssl_context is None:
                ssl_context = ssl.create_default_context()
            ssl_context.set_alpn_protocols(["h2"])
        self._ssl = ssl_context if self.scheme == "https" else None
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.probe_timeout = probe_timeout
        self._clock: Clock = clock or SystemClock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Request] = deque()
        self._conns: list[_Connection] = []  # ready and accepting new streams
        self._all: set[_Connection] = set()  # every open connection, draining ones too
        self._connecting = 0
        self._backoff = 0.0
        self._pump_scheduled = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Header names already found lower-case and allowed (callers repeat a few names).
        self._valid_names: set[str] = set()

    # public API -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the agreed interface; one timer per request
    ) -> Http2Response:
        """Send one request and wait for its whole response."""
        if self._closed:
            raise Http2Error("client is closed", maybe_processed=False)
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        fields = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", self.authority),
            (":path", path),
        ]
        valid = self._valid_names
        for name, value in headers:
            if name not in valid:  # checked once per name, not on every request
                name = self._check_name(name)
            fields.append((name, value))
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Http2Response] = loop.create_future()
        req = _Request(fields, body, future)
        wait = self.request_timeout if timeout is None else timeout
        req.timeout = wait
        req.deadline = deadline = loop.time() + wait
        req.timer = loop.call_at(deadline, self._on_timeout, req)
        if not self._queue and self._conns and self._conns[0].usable:
            self._conns[0].send(req)  # the common case: a stream is free right now
        else:
            self._queue.append(req)
            self._pump()
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(req)
            raise

    def _check_name(self, name: str) -> str:
        """``name`` lower-cased, or ValueError if HTTP/2 forbids it in a request."""
        lowered = name if name.islower() else name.lower()
        if lowered[:1] == ":" or lowered in _CONNECTION_HEADERS:
            raise ValueError(f"header not allowed in an HTTP/2 request: {lowered!r}")
        if lowered == name and len(self._valid_names) < 256:
            self._valid_names.add(name)
        return lowered

    async def aclose(self) -> None:
        """Close every connection; requests not yet answered fail with Http2Error."""
        self._closed = True
        while self._queue:
            self._fail(self._queue.popleft(), Http2Error("client closed", maybe_processed=False))
        for conn in list(self._all):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._conns.clear()

    # scheduling -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start queued requests on connections with free streams; connect when needed.

        A request past its deadline is failed here, never sent: its timer may not have
        run yet when many expire in the same loop iteration.
        """
        queue = self._queue
        now = -1.0
        while queue:
            req = queue[0]
            if req.future.done():
                queue.popleft()
                continue
            conn = None
            for c in self._conns:
                if c.usable:
                    conn = c
                    break
            if conn is None:
                self._maybe_connect()
                return
            queue.popleft()
            if now < 0:
                now = self._loop.time() if self._loop is not None else 0.0
            if req.deadline <= now:
                self._expire_queued(req)
                continue
            conn.send(req)

    def _schedule_pump(self) -> None:
        """Pump on the next loop iteration (timer callbacks must not send: other timers
        of the same iteration may be about to expire the requests they would send)."""
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        if self._queue and not self._closed:
            self._pump()

    def _maybe_connect(self) -> None:
        if self._closed or self._connecting:
            return
        if len(self._conns) >= self.max_connections:
            return  # all accepting connections are busy: wait for a free stream
        loop = self._loop
        assert loop is not None
        self._connecting += 1
        task = loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        loop = self._loop
        assert loop is not None
        conn = _Connection(self)
        try:
            if self._backoff:
                await asyncio.sleep(self._backoff)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await loop.create_connection(
                        lambda: conn,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    )
                    self._all.add(conn)
                    await conn.ready
            except TimeoutError:
                raise Http2ConnectError(
                    f"no HTTP/2 connection to {self.origin} within {self.connect_timeout}s"
                ) from None
            except ssl.SSLError as exc:
                raise Http2ConnectError(f"TLS handshake with {self.origin} failed: {exc}") from None
            except OSError as exc:
                raise Http2ConnectError(f"cannot connect to {self.origin}: {exc}") from None
            except Http2ConnectError:
                raise
            except Exception as exc:  # anything else must not leave requests hanging
                raise Http2ConnectError(f"cannot connect to {self.origin}: {exc!r}") from None
        except Http2ConnectError as exc:
            self._connecting -= 1
            if conn.transport is not None:
                conn.transport.abort()
            self._backoff = min(max(self._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
            log.warning("%s (next attempt in %.1fs at the earliest)", exc, self._backoff)
            if not self._conns:
                while self._queue:
                    self._fail(self._queue.popleft(), Http2ConnectError(str(exc)))
            return
        except asyncio.CancelledError:
            self._connecting -= 1
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self._connecting -= 1
        # The backoff is kept until the server answers a request on this connection:
        # a server that sends GOAWAY at once must not cause a tight reconnect loop.
        if self._closed:
            conn.close()
            return
        self._conns.append(conn)
        self._pump()
        conn.flush()

    def _retire(self, conn: _Connection) -> None:
        """Stop giving new requests to ``conn`` (GOAWAY or fatal error)."""
        if conn in self._conns:
            self._conns.remove(conn)
        if self._queue:
            self._pump()

    def _connection_gone(self, conn: _Connection) -> None:
        self._all.discard(conn)
        self._retire(conn)

    def _requeue(self, reqs: list[_Request]) -> None:
        """Put unprocessed requests back at the head of the queue, in their order."""
        for req in reversed(reqs):
            if not req.future.done():
                req.stream_id = 0
                self._queue.appendleft(req)
        self._pump()

    # completion -------------------------------------------------------------------------

    @staticmethod
    def _resolve(req: _Request, response: Http2Response) -> None:
        if req.timer is not None:
            req.timer.cancel()
        if not req.future.done():
            req.future.set_result(response)

    @staticmethod
    def _fail(req: _Request, exc: Exception) -> None:
        if req.timer is not None:
            req.timer.cancel()
        if not req.future.done():
            req.future.set_exception(exc)

    def _abandon(self, req: _Request) -> _Connection | None:
        """Forget a request (timeout or cancellation): reset its stream, free its slot.

        Returns the connection it was in flight on, if any. The freed slot is filled on
        the next loop iteration, never from here.
        """
        if req.timer is not None:
            req.timer.cancel()
        if req.stream_id:
            for conn in self._all:
                if conn.streams.get(req.stream_id) is req:
                    conn.cancel(req)
                    if self._queue:
                        self._schedule_pump()
                    return conn
        return None

    def _expire_queued(self, req: _Request) -> None:
        self._fail(
            req,
            Http2QueueTimeout(
                f"not sent to {self.origin}: no free stream within {req.timeout}s "
                "(the server never saw it)"
            ),
        )

    def _on_timeout(self, req: _Request) -> None:
        req.timer = None
        if req.future.done():
            return
        conn = self._abandon(req)
        if conn is None:
            # Still queued (or waiting to be re-sent): it never reached the server.
            self._expire_queued(req)
            return
        conn.probe()  # is the connection still alive?
        req.future.set_exception(
            Http2Timeout(f"no answer from {self.origin} within {req.timeout}s")
        )
