"""SIP over WebSocket (RFC 7118) for browser softphones: ``ws://`` and ``wss://`` on aiohttp.

Each WebSocket message carries exactly one SIP message, so no stream framing is needed.
A connection joins the transport layer's flow table under ``Address("WS", host, port)``
(``"WSS"`` over TLS, the only kind a page served over HTTPS may open): responses and later
requests to that browser go back over it (a browser can never be connected to, only
reached over the connection it opened).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Coroutine

from aiohttp import WSMsgType, web

from sipwake.sip.message import PONG, SipParseError, is_keepalive, parse_message
from sipwake.sip.transaction import Address
from sipwake.sip.transport import TransportLayer, error_response

log = logging.getLogger("sipwake.sip.websocket")

SUBPROTOCOL = "sip"

#: Serial numbers of WebSocket connections, unique in this process.
_serials = itertools.count(1)


class WsFlow:
    """One WebSocket connection as a flow of the transport layer."""

    def __init__(self, layer: TransportLayer, ws: web.WebSocketResponse, address: Address):
        self.layer = layer
        self.ws = ws
        self.address: Address | None = address
        #: Names this connection, not its address: a flow token carries it, so a request
        #: for a closed connection is not sent to a later one from the same ip:port.
        self.serial = next(_serials)
        self.last_activity = layer.clock.monotonic()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()

    def is_open(self) -> bool:
        return not self.ws.closed

    def write(self, data: bytes) -> None:
        """Queue one SIP message as one frame (RFC 7118 5.2 allows text or binary).

        Text when the message is valid UTF-8, else binary: a text frame must be UTF-8.
        """
        if self.ws.closed:
            return
        self.last_activity = self.layer.clock.monotonic()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._start(self.ws.send_bytes(data))
        else:
            self._start(self.ws.send_str(text))

    def close(self) -> None:
        self._start(self._close())

    def _start(self, coro: Coroutine[object, object, None]) -> None:
        """Run a send or close in a task that is kept and whose failure is observed."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.debug("WebSocket %s: send failed, closing: %s", self.address, exc)
            if not self.ws.closed:
                self._start(self._close())

    async def _close(self) -> None:
        await self.ws.close()

    def received(self, data: bytes) -> None:
        layer = self.layer
        self.last_activity = layer.clock.monotonic()
        assert self.address is not None
        if is_keepalive(data):
            # A CRLFCRLF ping gets a CRLF pong (RFC 5626 4.4.1, as over TCP); a lone
            # CRLF needs no answer.
            if data.count(b"\r\n") >= 2:
                self.write(PONG)
            return
        try:
            msg = parse_message(data, datagram=True, max_size=layer.config.max_message_size)
        except SipParseError as exc:
            answer = error_response(exc, data)
            if answer is not None:
                self.write(answer)
            return
        answer = layer.dispatch(msg, self.address)
        if answer is not None:
            self.write(answer)


class WebSocketListener:
    """An aiohttp server that upgrades requests asking for the ``sip`` subprotocol."""

    def __init__(
        self,
        layer: TransportLayer,
        transport: str = "WS",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.layer = layer
        #: "WS", or "WSS" with ``ssl_context``: the transport of the flows (and Vias).
        self.transport = transport
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.app = app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None)
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            # RFC 7118 4.1: the client must ask for the "sip" subprotocol.
            return web.json_response(
                {"error": "WebSocket subprotocol 'sip' required (RFC 7118)"}, status=400
            )
        # A SIP message is at most max-message-size (aiohttp closes with 1009 above it);
        # no permessage-deflate: a small frame must not inflate into a huge message.
        ws = web.WebSocketResponse(
            protocols=(SUBPROTOCOL,),
            max_msg_size=self.layer.config.max_message_size,
            compress=False,
        )
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if not peer:
            await ws.close()
            return ws
        flow = WsFlow(self.layer, ws, Address(self.transport, str(peer[0]), int(peer[1])))
        self.layer._register(flow)
        try:
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    data = frame.data.encode("utf-8", "surrogateescape")
                elif frame.type is WSMsgType.BINARY:
                    data = frame.data
                else:
                    continue
                flow.received(data)
        finally:
            self.layer._unregister(flow)
            if not flow.closed.done():
                flow.closed.set_result(None)
        return ws
