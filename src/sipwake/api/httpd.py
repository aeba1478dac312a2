"""A small HTTP/1.1 server for the API: llhttp (``httptools``) on an asyncio protocol.

aiohttp's request machinery cost about 100 µs of CPU per ``/pnm2/send`` request against
under 20 µs for parsing with llhttp and writing the answer directly, and the push gateway
is measured in requests per second per core. The API needs little of HTTP: bodies with a
length or chunked, keep-alive and pipelining (answers in request order), ``Expect:
100-continue``, a body size limit, an idle timeout. Anything malformed is answered 400
and the connection closed; nothing here raises into the event loop. A client that does
not read its answers gets no more of them (and its requests are not read) once
``WRITE_HIGH_WATER`` bytes wait to be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, cast

import httptools

log = logging.getLogger("sipwake.api.http")

MAX_URL = 8192
MAX_HEADER_BYTES = 65536
MAX_PIPELINED = 32  # requests queued on one connection before reading pauses
# Unsent answer bytes on one connection above which answering and reading pause until
# the client has read enough (below the low mark): a client that does not read its
# answers cannot make the server buffer them without limit.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
_CONTINUE = -1  # queue entry: write "100 Continue" in its place among the answers
IDLE_TIMEOUT = 75.0  # seconds without a byte or an answer under way


class Headers(dict[str, str]):
    """Request headers by lower-case name (repeated headers joined with ", ")."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class Request:
    """One request with its whole body (bodies are small and bounded by max_body_size)."""

    __slots__ = ("_query", "body", "ctx", "headers", "match_info", "method", "path", "remote",
                 "target")  # fmt: skip

    def __init__(
        self, method: str, target: str, headers: Headers, body: bytes, remote: str, ctx: Any
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = urllib.parse.unquote(path)
        self._query: dict[str, str] | None = None if query else {}
        self.headers = headers
        self.body = body
        self.remote = remote
        self.ctx = ctx
        self.match_info: dict[str, str] = {}

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (the first value of a repeated one)."""
        if self._query is None:
            out: dict[str, str] = {}
            for k, v in urllib.parse.parse_qsl(self.target.partition("?")[2], True):
                out.setdefault(k, v)
            self._query = out
        return self._query

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower case ("" when absent)."""
        value: str = self.headers.get("content-type", "")
        return value.partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        return self.body

    async def post(self) -> dict[str, str]:
        """The url-encoded form fields (the first value of a repeated field)."""
        out: dict[str, str] = {}
        text = self.body.decode("utf-8", "replace")
        for k, v in urllib.parse.parse_qsl(text, keep_blank_values=True):
            out.setdefault(k, v)
        return out


class Response:
    """Status, headers and a complete body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, body: bytes = b"", status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers or {}


Handler = Callable[[Request], Awaitable[Response]]
#: Builds the error answer for a path: (path, status, title, detail) -> response.
ErrorResponder = Callable[[str, int, str, str], Response]

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header value, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def encode_response(response: Response, keep_alive: bool, head: bool = False) -> bytes:
    status = response.status
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Unknown").encode()),
        b"Date: " + _date() + b"\r\n",
        b"Content-Length: %d\r\n" % len(response.body),
    ]
    for name, value in response.headers.items():
        lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(response.body)
    return b"".join(lines)


class _TooLarge(Exception):
    """A request beyond a limit: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        # (request, keep-alive, error status, error detail); no request: answer the error.
        self.queue: deque[tuple[Request | None, bool, int, str]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.paused = False  # reading paused (for the pipeline or for writing)
        self.pipeline_full = False
        self.write_paused = False
        self.drained: asyncio.Event | None = None  # set while writing is not paused
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.fail_path = ""
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_list: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else ""
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self.timer = loop.call_later(self.server.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        """The transport holds more than the high-water mark: stop answering and reading."""
        self.write_paused = True
        if self.drained is not None:
            self.drained.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = asyncio.get_running_loop().time()  # the client reads: progress
        if self.drained is not None:
            self.drained.set()
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause reading while the pipeline is full or answers cannot be written."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = self.pipeline_full or self.write_paused
        if want and not self.paused:
            self.paused = True
            transport.pause_reading()
        elif not want and self.paused:
            self.paused = False
            transport.resume_reading()

    async def _wait_drained(self) -> None:
        if self.drained is None:
            self.drained = asyncio.Event()
        if self.write_paused:
            self.drained.clear()
            await self.drained.wait()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = asyncio.get_running_loop().time()
        try:
            self.parser.feed_data(data)
        except _TooLarge as exc:
            self._fail(exc.status, exc.detail)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            # An exception raised in a callback comes back wrapped by the parser.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _TooLarge):
                self._fail(cause.status, cause.detail)
            else:
                self._fail(400, f"malformed HTTP request: {exc}")

    def _fail(self, status: int, detail: str) -> None:
        """Answer the broken request after those queued before it, then close."""
        self.closing = True
        self.fail_path = self.url.decode("latin-1", "replace").partition("?")[0]
        self.queue.append((None, False, status, detail))
        self._start()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        # Waiting for a client that does not read its answers is not being busy.
        busy = self.task is not None and not self.task.done() and not self.write_paused
        idle = loop.time() - self.last_active
        if not busy and idle >= self.server.idle_timeout and self.transport is not None:
            self.transport.close()
            return
        wait = self.server.idle_timeout - (0 if busy else idle)
        self.timer = loop.call_later(max(1.0, wait), self._check_idle)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            raise _TooLarge(414, f"request target longer than {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge(431, f"request headers larger than {MAX_HEADER_BYTES} bytes")
        self.header_list.append((name, value))

    def on_headers_complete(self) -> None:
        length = 0
        expect = False
        for name, value in self.header_list:
            lname = name.lower()
            if lname == b"content-length":
                with contextlib.suppress(ValueError):
                    length = int(value)
            elif lname == b"expect" and value.lower() == b"100-continue":
                expect = True
        if length > self.server.max_body_size:
            raise _TooLarge(413, self._body_limit())
        if expect and self.transport is not None:
            if self.queue or (self.task is not None and not self.task.done()):
                # Earlier answers are still due: "100 Continue" must come after them.
                self.queue.append((None, True, _CONTINUE, ""))
                self._start()
            else:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_limit(self) -> str:
        return f"request body larger than {self.server.max_body_size} bytes"

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > self.server.max_body_size:
            self.too_large = True
        if not self.too_large:
            self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = bool(self.parser.should_keep_alive())
        method = self.parser.get_method().decode("ascii", "replace")
        if self.too_large:
            # The body was not kept; answering and closing is simpler than draining it.
            self._fail(413, self._body_limit())
            return
        headers = Headers()
        for name, value in self.header_list:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            prior = headers.get(key)
            headers[key] = f"{prior}, {text}" if prior is not None else text
        target = self.url.decode("latin-1")
        request = Request(method, target, headers, b"".join(self.body), self.remote, None)
        self.queue.append((request, keep_alive, 0, ""))
        if len(self.queue) > MAX_PIPELINED and not self.pipeline_full:
            self.pipeline_full = True
            self._update_reading()
        self._start()

    # -- answering ----------------------------------------------------------------------------

    def _start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._answer_all())

    async def _answer_all(self) -> None:
        while self.queue and self.transport is not None and not self.transport.is_closing():
            if self.write_paused:
                await self._wait_drained()
                continue  # the transport may have closed meanwhile
            request, keep_alive, status, detail = self.queue.popleft()
            if status == _CONTINUE:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                continue
            if request is None:
                reason = _REASONS.get(status, "Error")
                response = self.server.on_error(self.fail_path, status, reason, detail or reason)
                self.transport.write(encode_response(response, keep_alive=False))
                self.transport.close()
                return
            try:
                response = await self.server.handler(request)
            except asyncio.CancelledError:
                raise
            except Exception:  # the dispatcher answers errors itself; this is a last resort
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = self.server.on_error(
                    request.path, 500, "Internal Server Error", "internal error"
                )
            keep_alive = keep_alive and not (self.closing and not self.queue)
            head = request.method == "HEAD"
            self.transport.write(encode_response(response, keep_alive, head))
            self.last_active = asyncio.get_running_loop().time()
            if not keep_alive:  # requests pipelined after "Connection: close" are dropped
                self.transport.close()
                return
            if self.pipeline_full and len(self.queue) <= MAX_PIPELINED // 2:
                self.pipeline_full = False
                self._update_reading()


class HttpServer:
    """Listens on one address and hands every complete request to ``handler``."""

    def __init__(
        self,
        handler: Handler,
        on_error: ErrorResponder,
        *,
        max_body_size: int = 1 << 20,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.on_error = on_error
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def addresses(self) -> list[str]:
        """The IP addresses the server listens on."""
        if self._server is None:
            return []
        return [str(sock.getsockname()[0]) for sock in self._server.sockets]

    async def close(self) -> None:
        """Stop listening and close every connection (answers under way are dropped)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
