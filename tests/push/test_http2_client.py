"""Http2Client against real HTTP/2 servers on 127.0.0.1 (h2 on asyncio, written here)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sipwake.push.http2 import (
    Http2Client,
    Http2ConnectError,
    Http2Error,
    Http2QueueTimeout,
    Http2Timeout,
)
from tests.conftest import free_port

REFUSED_STREAM = 7


class Conn(asyncio.Protocol):
    """One server-side connection; answers through the server's handler."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.open: set[int] = set()
        self.pending_bodies: dict[int, bytes] = {}
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.append(self)
        codes = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.server.max_streams,
                codes.INITIAL_WINDOW_SIZE: self.server.initial_window,
            },
        )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.server.errors.append(repr(exc))
            self.flush()
            assert self.transport is not None
            self.transport.close()
            return
        ended: list[int] = []
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                assert ev.stream_id is not None and ev.headers is not None
                self.requests[ev.stream_id] = (dict(ev.headers), bytearray())  # type: ignore[arg-type]
                self.open.add(ev.stream_id)
                self.server.peak = max(self.server.peak, self.server.open_streams)
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None and ev.data is not None
                self.requests[ev.stream_id][1].extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                ended.append(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.open.discard(ev.stream_id or 0)
                self.server.resets.append(ev.error_code or 0)
                self.server.reset_seen.set()
            elif isinstance(ev, h2.events.PingReceived):
                self.server.pings.set()
            elif isinstance(ev, h2.events.PingAckReceived):
                self.server.ping_acks.set()
            elif isinstance(ev, h2.events.WindowUpdated):
                for sid in list(self.pending_bodies):
                    self._send_body(sid)
        for sid in ended:
            headers, body = self.requests[sid]
            self.server.received[headers[":path"]] += 1
            self.server.handler(self, sid, headers, bytes(body))
        self.flush()

    def respond(self, sid: int, status: int = 200, body: bytes = b"") -> None:
        headers = self.requests[sid][0]
        self.server.answered[headers[":path"]] += 1
        out = [(":status", str(status)), ("apns-id", headers.get("apns-id", "none"))]
        self.h2.send_headers(sid, out, end_stream=not body)
        if body:
            self.pending_bodies[sid] = body
            self._send_body(sid)
        else:
            self.open.discard(sid)

    def _send_body(self, sid: int) -> None:
        body = self.pending_bodies[sid]
        while body:
            n = min(len(body), self.h2.local_flow_control_window(sid), 16384)
            if n <= 0:
                break
            self.h2.send_data(sid, body[:n], end_stream=n == len(body))
            body = body[n:]
        if body:
            self.pending_bodies[sid] = body
        else:
            del self.pending_bodies[sid]
            self.open.discard(sid)

    def reset(self, sid: int, code: int) -> None:
        self.h2.reset_stream(sid, error_code=code)
        self.open.discard(sid)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open.clear()
        self.server.closed.set()


Handler = Callable[[Conn, int, dict[str, str], bytes], None]


def answer_all(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
    conn.respond(sid)


class H2Server:
    def __init__(self, handler: Handler = answer_all, *, max_streams: int = 100) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.initial_window = 65_535
        self.port = free_port()
        self.connections: list[Conn] = []
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.resets: list[int] = []
        self.errors: list[str] = []
        self.peak = 0
        self.reset_seen = asyncio.Event()
        self.pings = asyncio.Event()
        self.ping_acks = asyncio.Event()
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def open_streams(self) -> int:
        return sum(len(c.open) for c in self.connections)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Conn(self), "127.0.0.1", self.port, ssl=ssl_context
        )

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for c in self.connections:
            if c.transport is not None:
                c.transport.abort()
        await self._server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[H2Server]:
    srv = H2Server()
    await srv.start()
    yield srv
    await srv.stop()


def client_for(srv: H2Server, **kwargs: float) -> Http2Client:
    return Http2Client(f"http://127.0.0.1:{srv.port}", **kwargs)  # type: ignore[arg-type]


async def send_many(client: Http2Client, n: int, prefix: str = "/3/device/") -> list[int]:
    async def one(i: int) -> int:
        resp = await client.request("POST", f"{prefix}{i}", [("apns-id", str(i))], b"{}")
        assert resp.headers["apns-id"] == str(i)
        return resp.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_requests_beyond_max_concurrent_streams_wait_in_fifo_order(
    server: H2Server,
) -> None:
    server.max_streams = 3
    order: list[str] = []

    def record(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        order.append(headers[":path"])
        conn.respond(sid)

    server.handler = record
    client = client_for(server)
    try:
        assert await send_many(client, 40) == [200] * 40
    finally:
        await client.aclose()
    assert server.peak == 3
    assert order == [f"/3/device/{i}" for i in range(40)]
    assert len(server.connections) == 1  # one long-lived connection
    assert not server.errors


async def test_goaway_mid_batch_resends_unprocessed_requests_exactly_once(
    server: H2Server,
) -> None:
    n = 10

    def goaway_after_four(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        if conn is not server.connections[0]:
            conn.respond(sid)
            return
        if len(conn.requests) < n or conn.closing:
            return  # hold until the whole batch is in, then act on all of it
        conn.closing = True
        for s in sorted(conn.requests)[:4]:
            conn.respond(s)
        conn.h2.close_connection(last_stream_id=sorted(conn.requests)[3])
        conn.flush()
        assert conn.transport is not None
        conn.transport.close()

    server.handler = goaway_after_four
    client = client_for(server)
    try:
        assert await send_many(client, n) == [200] * n
    finally:
        await client.aclose()
    assert len(server.connections) == 2
    assert set(server.answered.values()) == {1} and len(server.answered) == n


async def test_refused_stream_is_resent_once(server: H2Server) -> None:
    def refuse_first_time(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        if server.received[headers[":path"]] == 1:
            conn.reset(sid, REFUSED_STREAM)
        else:
            conn.respond(sid)

    server.handler = refuse_first_time
    client = client_for(server)
    try:
        assert await send_many(client, 3) == [200] * 3
    finally:
        await client.aclose()
    assert server.received == Counter({f"/3/device/{i}": 2 for i in range(3)})
    assert set(server.answered.values()) == {1}


async def test_other_stream_reset_fails_without_resend(server: H2Server) -> None:
    server.handler = lambda conn, sid, h, b: conn.reset(sid, 2)  # INTERNAL_ERROR
    client = client_for(server)
    try:
        with pytest.raises(Http2Error, match="INTERNAL_ERROR") as info:
            await client.request("POST", "/x", [], b"{}")
    finally:
        await client.aclose()
    assert server.received["/x"] == 1
    assert info.value.maybe_processed is True  # the server may have acted on it


async def test_timeout_raises_resets_the_stream_and_frees_the_slot(server: H2Server) -> None:
    server.max_streams = 1

    def hang_on_slow(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        if headers[":path"] != "/slow":
            conn.respond(sid)

    server.handler = hang_on_slow
    client = client_for(server)
    try:
        with pytest.raises(Http2Timeout):
            await client.request("POST", "/slow", [], b"{}", timeout=0.2)
        await asyncio.wait_for(server.reset_seen.wait(), 5)
        assert server.resets == [8]  # CANCEL
        resp = await client.request("POST", "/fast", [], b"{}")
        assert resp.status == 200
    finally:
        await client.aclose()


async def test_keepalive_ping_sent_and_server_ping_answered(server: H2Server) -> None:
    client = client_for(server, ping_interval=0.05)
    try:
        assert (await client.request("GET", "/", [])).status == 200
        await asyncio.wait_for(server.pings.wait(), 5)
        conn = server.connections[0]
        conn.h2.ping(b"pingpong")
        conn.flush()
        await asyncio.wait_for(server.ping_acks.wait(), 5)
    finally:
        await client.aclose()


async def test_large_bodies_cross_flow_control_windows(server: H2Server) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, 16 times the default window

    def echo_big(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        assert body == big[: len(body)]
        conn.respond(sid, body=big)

    server.handler = echo_big
    server.initial_window = 4096  # the request body must wait for the server's updates
    client = client_for(server)
    try:
        responses = await asyncio.gather(
            *(client.request("POST", f"/{i}", [], big[:200_000]) for i in range(3))
        )
    finally:
        await client.aclose()
    assert [r.body == big for r in responses] == [True] * 3


async def test_server_closing_connection_then_next_requests_use_a_new_one(
    server: H2Server,
) -> None:
    def answer_then_close(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        conn.respond(sid)
        conn.flush()
        assert conn.transport is not None
        conn.transport.close()

    server.handler = answer_then_close
    client = client_for(server)
    try:
        assert (await client.request("POST", "/a", [], b"{}")).status == 200
        await asyncio.wait_for(server.closed.wait(), 5)
        server.handler = answer_all
        assert await send_many(client, 5) == [200] * 5
    finally:
        await client.aclose()
    assert len(server.connections) == 2


async def test_connection_lost_after_request_sent_fails_without_resend(server: H2Server) -> None:
    def drop(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        assert conn.transport is not None
        conn.transport.abort()

    server.handler = drop
    client = client_for(server)
    try:
        with pytest.raises(Http2Error, match="lost"):
            await client.request("POST", "/maybe-processed", [], b"{}")
    finally:
        await client.aclose()
    assert server.received["/maybe-processed"] == 1


async def test_connect_refused_is_a_connect_error() -> None:
    client = Http2Client(f"http://127.0.0.1:{free_port()}", connect_timeout=5)
    try:
        with pytest.raises(Http2ConnectError, match="cannot connect"):
            await client.request("GET", "/", [])
    finally:
        await client.aclose()


async def test_bad_request_input_is_rejected_precisely(server: H2Server) -> None:
    client = client_for(server)
    try:
        with pytest.raises(ValueError, match="connection"):
            await client.request("GET", "/", [("Connection", "close")])
        with pytest.raises(ValueError, match="path"):
            await client.request("GET", "x", [])
    finally:
        await client.aclose()
    with pytest.raises(ValueError, match="base_url"):
        Http2Client("ftp://example.org")


# --- TLS ---------------------------------------------------------------------------------


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "c.pem", directory / "k.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def server_tls(cert: Path, key: Path, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx


async def test_tls_with_private_ca_and_alpn_h2(tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path)
    srv = H2Server()
    await srv.start(server_tls(cert, key, ["h2"]))
    client = Http2Client(
        f"https://127.0.0.1:{srv.port}", ssl_context=ssl.create_default_context(cafile=ca)
    )
    try:
        assert await send_many(client, 5) == [200] * 5
    finally:
        await client.aclose()
        await srv.stop()


async def test_untrusted_certificate_is_a_tls_connect_error(tmp_path: Path) -> None:
    _ca, cert, key = make_pki(tmp_path)
    srv = H2Server()
    await srv.start(server_tls(cert, key, ["h2"]))
    client = Http2Client(f"https://127.0.0.1:{srv.port}")  # system trust store
    try:
        with pytest.raises(Http2ConnectError, match="TLS"):
            await client.request("GET", "/", [])
    finally:
        await client.aclose()
        await srv.stop()


async def test_server_without_h2_alpn_is_a_clear_connect_error(tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path)
    srv = H2Server()
    await srv.start(server_tls(cert, key, ["http/1.1"]))
    client = Http2Client(
        f"https://127.0.0.1:{srv.port}", ssl_context=ssl.create_default_context(cafile=ca)
    )
    try:
        with pytest.raises(Http2ConnectError, match="did not select HTTP/2 by ALPN"):
            await client.request("GET", "/", [])
    finally:
        await client.aclose()
        await srv.stop()
    assert not srv.received


async def test_request_timing_out_in_queue_is_never_sent(server: H2Server) -> None:
    server.max_streams = 1
    first_arrived = asyncio.Event()

    def hold(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        first_arrived.set()  # and never answer

    server.handler = hold
    client = client_for(server)
    try:
        first = asyncio.ensure_future(client.request("POST", "/first", [], b"{}", timeout=30))
        await asyncio.wait_for(first_arrived.wait(), 5)
        with pytest.raises(Http2Timeout):
            await client.request("POST", "/queued", [], b"{}", timeout=0.2)
        first.cancel()  # cancelling frees the stream for the next request
        with pytest.raises(asyncio.CancelledError):
            await first
        server.handler = answer_all
        assert (await client.request("POST", "/after", [], b"{}")).status == 200
    finally:
        await client.aclose()
    assert "/queued" not in server.received
    assert server.resets == [8]  # the cancelled first request was reset with CANCEL


async def test_request_not_yet_written_when_connection_drops_is_sent_on_a_new_one(
    server: H2Server,
) -> None:
    client = client_for(server)
    try:
        assert (await client.request("POST", "/warm", [], b"{}")).status == 200
        pending = asyncio.ensure_future(client.request("POST", "/unsent", [], b"{}"))
        await asyncio.sleep(0)  # let request() hand its frames over; the write comes later
        conn = next(c for c in client._all)
        assert conn.transport is not None
        conn.transport.abort()  # the connection dies before the frames reach the socket
        assert (await pending).status == 200
    finally:
        await client.aclose()
    assert server.received["/unsent"] == 1
    assert len(server.connections) == 2


async def test_max_connections_spreads_requests_when_streams_run_out(server: H2Server) -> None:
    server.max_streams = 2
    held: list[tuple[Conn, int]] = []

    def answer_when_four_wait(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        held.append((conn, sid))
        if len(held) == 4:  # both connections full: only then answer everything
            for c, s in held:
                c.respond(s)
                c.flush()
        elif len(held) > 4:
            conn.respond(sid)

    server.handler = answer_when_four_wait
    client = client_for(server, max_connections=2)
    try:
        assert await send_many(client, 8) == [200] * 8
    finally:
        await client.aclose()
    assert len(server.connections) == 2
    assert server.peak == 4


async def test_queued_requests_expiring_together_are_never_sent(server: H2Server) -> None:
    # One stream; five requests share one deadline. When it passes, the in-flight one is
    # reset and the four queued ones must fail unsent, not be started in its freed slot.
    server.max_streams = 1
    server.handler = lambda conn, sid, headers, body: None  # never answers
    client = client_for(server)
    try:
        results = await asyncio.gather(
            *(client.request("POST", f"/r{i}", [], b"{}", timeout=0.3) for i in range(5)),
            return_exceptions=True,
        )
        await asyncio.wait_for(server.reset_seen.wait(), 5)
        # Anything wrongly sent after the reset would reach the server before this answer.
        server.handler = answer_all
        assert (await client.request("POST", "/after", [], b"{}")).status == 200
    finally:
        await client.aclose()
    assert all(isinstance(r, Http2Timeout) for r in results)
    assert not isinstance(results[0], Http2QueueTimeout)  # sent, maybe processed
    assert all(isinstance(r, Http2QueueTimeout) for r in results[1:])  # never sent
    assert sorted(server.received) == ["/after", "/r0"]


async def test_dead_connection_is_dropped_soon_after_a_request_times_out(
    server: H2Server,
) -> None:
    # The server stops reading (a black hole): the request times out and a PING is sent.
    # The next request waits for its answer instead of going into the black hole; the
    # PING goes unanswered, so the connection is dropped (not after the keep-alive
    # interval of an hour) and the request goes to a new one.
    def black_hole(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        if headers[":path"] == "/hang":
            assert conn.transport is not None
            conn.transport.pause_reading()
        else:
            conn.respond(sid)

    server.handler = black_hole
    client = client_for(server, ping_interval=3600.0, probe_timeout=0.2)
    try:
        with pytest.raises(Http2Timeout):
            await client.request("POST", "/hang", [], b"{}", timeout=0.2)
        assert (await client.request("POST", "/next", [], b"{}", timeout=5)).status == 200
    finally:
        await client.aclose()
    assert server.answered["/next"] == 1
    assert len(server.connections) == 2


async def test_live_connection_is_kept_after_a_request_times_out(server: H2Server) -> None:
    # A slow answer is not a dead connection: the PING is answered and it stays in use.
    def hang_on_slow(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        if headers[":path"] != "/slow":
            conn.respond(sid)

    server.handler = hang_on_slow
    client = client_for(server, ping_interval=3600.0, probe_timeout=30.0)
    try:
        with pytest.raises(Http2Timeout):
            await client.request("POST", "/slow", [], b"{}", timeout=0.2)
        assert (await client.request("POST", "/fast", [], b"{}", timeout=5)).status == 200
        await asyncio.wait_for(server.pings.wait(), 5)
    finally:
        await client.aclose()
    assert len(server.connections) == 1


async def test_server_sending_goaway_at_once_bounds_resends_and_backs_off(
    server: H2Server,
) -> None:
    def goaway(conn: Conn, sid: int, headers: dict[str, str], body: bytes) -> None:
        conn.h2.close_connection(last_stream_id=0)  # "not processed"
        conn.flush()

    server.handler = goaway
    client = client_for(server)
    try:
        with pytest.raises(Http2Error) as info:
            await client.request("POST", "/x", [], b"{}", timeout=30)
    finally:
        await client.aclose()
    assert not isinstance(info.value, Http2Timeout)
    assert "GOAWAY" in str(info.value)
    assert info.value.maybe_processed is False  # safe for a caller to send again later
    assert server.received["/x"] == 4  # sent once, re-sent MAX_RESENDS times
    assert len(server.connections) == 4
