"""A small asyncio HTTP/2 client for driving the simulators from tests (h2 over TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    stream_id: int

    def json(self) -> dict[str, object]:
        import json

        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class _Stream:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    done: asyncio.Future[Response] | None = None


class H2Client:
    """One HTTP/2 connection; concurrent requests map to streams."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, _Stream] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.remote_settings_seen = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.authority = ""

    @classmethod
    async def connect(cls, url: str, ctx: ssl.SSLContext) -> H2Client:
        self = cls()
        parts = urlsplit(url)
        self.authority = parts.netloc
        self.reader, self.writer = await asyncio.open_connection(
            parts.hostname, parts.port, ssl=ctx, server_hostname=parts.hostname
        )
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())
        self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def _read_loop(self) -> None:
        assert self.reader is not None and self.writer is not None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                out = self.conn.data_to_send()
                if out:
                    self.writer.write(out)
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            for st in self.streams.values():
                if st.done is not None and not st.done.done():
                    st.done.set_exception(ConnectionError("connection closed"))

    def _event(self, ev: object) -> None:
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            self.remote_settings_seen.set()
        elif isinstance(ev, h2.events.ResponseReceived):
            self.streams[ev.stream_id].headers = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            self.streams[ev.stream_id].body += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.streams[ev.stream_id]
            status = int(st.headers.pop(":status"))
            assert st.done is not None
            st.done.set_result(Response(status, st.headers, bytes(st.body), ev.stream_id))
        elif isinstance(ev, h2.events.StreamReset):
            st = self.streams[ev.stream_id]
            if st.done is not None and not st.done.done():
                st.done.set_exception(ConnectionError(f"stream reset {ev.error_code}"))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev
            last = ev.last_stream_id or 0
            for sid, st in self.streams.items():
                if sid > last and st.done is not None and not st.done.done():
                    st.done.set_exception(ConnectionRefusedError(f"stream {sid} refused by GOAWAY"))

    def start(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> asyncio.Future[Response]:
        """Send a request now; the future resolves with the response."""
        assert self.writer is not None
        sid = self.conn.get_next_available_stream_id()
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.streams[sid] = _Stream(done=fut)
        hdrs = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self.authority),
            (":path", path),
            *(headers or []),
        ]
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        return fut

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Response:
        return await asyncio.wait_for(self.start(method, path, headers, body), 10)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self.writer.wait_closed()
        if self._task is not None:
            await self._task
