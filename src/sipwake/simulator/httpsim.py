"""The HTTP edge shared by the FCM, Web Push and external-pusher simulators.

A simulator is a request handler (:data:`Handler`) over plain values; this module serves it
over HTTP/1.1 (aiohttp) or HTTP/2 (the sans-IO :mod:`h2server` connection, with TLS+ALPN or
cleartext prior knowledge), so one simulator can answer both ways, as the real services do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from aiohttp import web

from sipwake.simulator.h2server import Http2ProtocolError, Http2Request, Http2ServerConnection


@dataclass(frozen=True, slots=True)
class SimRequest:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-case names, pseudo-headers excluded
    body: bytes
    http_version: str  # "1.1" or "2"


@dataclass(frozen=True, slots=True)
class SimResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


Handler = Callable[[SimRequest], Awaitable[SimResponse]]


class _H2Protocol(asyncio.Protocol):
    def __init__(self, handler: Handler, server: HttpSimServer) -> None:
        self._handler = handler
        self._server = server
        self._conn = Http2ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self._server.accepted += 1
        self._flush()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            requests = self._conn.receive_data(data)
        except Http2ProtocolError:
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        self._flush()
        for request in requests:
            task = asyncio.get_running_loop().create_task(self._answer(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: Http2Request) -> None:
        headers = {k: v for k, v in request.headers if not k.startswith(":")}
        sim = SimRequest(
            request.header(":method") or "",
            request.header(":path") or "/",
            headers,
            request.body,
            "2",
        )
        try:
            resp = await self._handler(sim)
        except Exception:  # a simulator bug must still answer, as a server would
            resp = SimResponse(500, [("content-type", "text/plain")], b"simulator error")
        self._conn.respond(request.stream_id, resp.status, resp.headers, resp.body)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for task in self._tasks:
            task.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class HttpSimServer:
    """One listening socket serving a handler over HTTP/1.1 or HTTP/2."""

    def __init__(
        self,
        handler: Handler,
        *,
        http2: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._handler = handler
        self.http2 = http2
        self._ssl = ssl_context
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self.connections: set[_H2Protocol] = set()
        self.accepted = 0  # HTTP/2 connections accepted so far
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def _aiohttp_handler(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        sim = SimRequest(
            request.method,
            request.path_qs,
            {k.lower(): v for k, v in request.headers.items()},
            body,
            "1.1",
        )
        resp = await self._handler(sim)
        return web.Response(status=resp.status, headers=resp.headers, body=resp.body)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> HttpSimServer:
        loop = asyncio.get_running_loop()
        if self.http2:
            self._server = await loop.create_server(
                lambda: _H2Protocol(self._handler, self), host, port, ssl=self._ssl
            )
        else:
            self._web = web.Server(self._aiohttp_handler, access_log=None)
            self._server = await loop.create_server(self._web, host, port, ssl=self._ssl)
        sock = self._server.sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        return self

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for proto in list(self.connections):
            proto.close()
        if self._web is not None:
            await self._web.shutdown(timeout=0.2)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None


def json_response(
    status: int, payload: object, headers: list[tuple[str, str]] | None = None
) -> SimResponse:
    return SimResponse(
        status,
        [("content-type", "application/json"), *(headers or [])],
        json.dumps(payload).encode(),
    )
