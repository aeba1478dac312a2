"""A recording receiver for the generic external pusher (``[push.external]``).

It answers every request with a configurable status and keeps what came in (method, path
with the decoded query, headers, body, HTTP version), so tests and users can see exactly
what their own pusher would receive. Over HTTP/1.1, or HTTP/2 (h2c prior knowledge, or TLS
with ALPN h2 when given a TLS context).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from sipwake.simulator.httpsim import HttpSimServer, SimRequest, SimResponse


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str  # as sent, still escaped
    query: dict[str, list[str]]  # decoded
    headers: dict[str, str]
    body: bytes
    http_version: str


@dataclass(slots=True)
class ExternalReceiver:
    status: int = 200
    received: list[Received] = field(default_factory=list)
    server: HttpSimServer | None = None
    hold: asyncio.Event | None = None  # when set, answers wait for it (a slow pusher)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at each request

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        http2: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> ExternalReceiver:
        self.server = await HttpSimServer(self.handle, http2=http2, ssl_context=ssl_context).start(
            host, port
        )
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.url

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()

    async def handle(self, req: SimRequest) -> SimResponse:
        parts = urlsplit(req.path)
        self.received.append(
            Received(
                req.method,
                req.path,
                parse_qs(parts.query, keep_blank_values=True),
                req.headers,
                req.body,
                req.http_version,
            )
        )
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        return SimResponse(self.status, [("content-type", "text/plain")], b"recorded")
