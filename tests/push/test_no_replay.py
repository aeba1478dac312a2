"""A push that may have reached the provider is never sent again (FCM, Web Push).

The servers here read one whole request and then drop the connection without answering:
the provider may have forwarded the push to the device, so sending it again could make
the phone ring twice. Only a request that provably never got to the server is retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sipwake.clock import FakeClock
from sipwake.push.http2 import Http2ConnectError, Http2Error, Http2QueueTimeout, Http2Timeout
from sipwake.push.providers.fcm import FcmLegacyProvider, FcmV1Provider, load_service_accounts
from sipwake.push.providers.transport import (
    Http1Transport,
    Http2Transport,
    TransportError,
    make_transport,
)
from sipwake.push.providers.webpush import VapidKey, WebPushProvider
from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest
from sipwake.simulator.fcm import FcmSimulator
from tests.push.fcm_helpers import FakeSleep, fcm_request

PROJECT = "sipwake-test"


class _DropH2(asyncio.Protocol):
    """HTTP/2 (h2c): counts complete requests and closes the connection on each."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.bodies: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.DataReceived):
                self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
            elif isinstance(ev, h2.events.StreamEnded):
                self.seen.append(self.bodies.pop(ev.stream_id, b""))
                self.transport.close()  # processed, but the answer is lost
                return
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]


class _DropH1(asyncio.Protocol):
    """HTTP/1.1: counts complete requests and closes the connection on each."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) >= length:
            self.seen.append(rest[:length])
            self.transport.close()


@pytest.fixture
async def drop_h2() -> AsyncIterator[tuple[str, list[bytes]]]:
    seen: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(lambda: _DropH2(seen), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    server.close()


@pytest.fixture
async def drop_h1() -> AsyncIterator[tuple[str, list[bytes]]]:
    seen: list[bytes] = []
    server = await asyncio.get_running_loop().create_server(lambda: _DropH1(seen), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    server.close()


async def test_fcm_legacy_over_http2_lost_answer_is_not_resent(
    drop_h2: tuple[str, list[bytes]],
) -> None:
    url, seen = drop_h2
    clock = FakeClock()
    sleep = FakeSleep(clock)
    provider = FcmLegacyProvider(
        {PROJECT: "key"}, server=url, transport=Http2Transport(), clock=clock, sleep=sleep
    )
    result = await provider.send(fcm_request())
    await provider.aclose()
    assert len(seen) == 1  # the server got the push exactly once
    assert result.outcome is Outcome.FAILED
    assert "connection lost after sending" in result.reason
    assert sleep.delays == []


async def test_fcm_v1_over_http1_lost_answer_is_not_resent(
    drop_h1: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    url, seen = drop_h1
    clock = FakeClock()
    sleep = FakeSleep(clock)
    sim = await FcmSimulator(clock=clock).start()  # the OAuth2 token endpoint
    try:
        path = tmp_path / "sa.json"
        sim.create_service_account(PROJECT, path)
        provider = FcmV1Provider(
            load_service_accounts({PROJECT: str(path)}),
            server=url,
            transport=Http1Transport(),
            clock=clock,
            sleep=sleep,
        )
        result = await provider.send(fcm_request())
        await provider.aclose()
    finally:
        await sim.aclose()
    assert len(seen) == 1
    assert result.outcome is Outcome.FAILED
    assert "connection lost after sending" in result.reason
    assert sleep.delays == []


async def test_webpush_lost_answer_is_not_resent(drop_h1: tuple[str, list[bytes]]) -> None:
    url, seen = drop_h1
    clock = FakeClock()
    sleep = FakeSleep(clock)
    vapid = VapidKey(ec.generate_private_key(ec.SECP256R1()), "mailto:ops@example.org")
    provider = WebPushProvider(vapid, transport=Http1Transport(), clock=clock, sleep=sleep)
    request = PushRequest(Destination(Provider.WEBPUSH, "", f"{url}/push/sub1"), PushKind.CALL)
    result = await provider.send(request)
    await provider.aclose()
    assert len(seen) == 1
    assert result.outcome is Outcome.FAILED
    assert "connection lost after sending" in result.reason
    assert sleep.delays == []


async def test_http1_connect_failure_may_be_retried() -> None:
    from tests.conftest import free_port

    transport = Http1Transport()
    with pytest.raises(TransportError) as caught:
        await transport.request("POST", f"http://127.0.0.1:{free_port()}/x", [], b"{}")
    await transport.aclose()
    assert caught.value.maybe_processed is False


def test_http2_failures_say_whether_the_request_may_have_run() -> None:
    from sipwake.push.providers.transport import _classify_http2

    origin = "https://fcm.example:443"
    # As Http2Client raises them: it marks what the server provably never acted on.
    never = [
        Http2ConnectError("cannot connect to x: refused"),
        Http2Error("stream reset by server: REFUSED_STREAM", maybe_processed=False),
        Http2Error("client is closed", maybe_processed=False),
        Http2QueueTimeout("timed out before it was sent"),
    ]
    for exc in never:
        assert _classify_http2(origin, exc).maybe_processed is False, exc
    maybe = [
        Http2Error("connection to x lost before the answer"),
        Http2Error("stream reset by server: INTERNAL_ERROR"),
        Http2Timeout("no answer"),
    ]
    for exc in maybe:
        assert _classify_http2(origin, exc).maybe_processed is True, exc


class _SilentH1(asyncio.Protocol):
    """HTTP/1.1: takes every request and never answers it."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen

    def data_received(self, data: bytes) -> None:
        self.seen.append(data)


class _SilentH2(_DropH2):
    """HTTP/2 (h2c): takes every request and never answers it."""

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.StreamEnded):
                self.seen.append(b"request")
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", ["http", "http2"])
async def test_a_request_that_timed_out_may_have_been_processed(protocol: str) -> None:
    seen: list[bytes] = []
    silent = _SilentH1 if protocol == "http" else _SilentH2
    server = await asyncio.get_running_loop().create_server(lambda: silent(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = make_transport(protocol, request_timeout=0.2)
    try:
        with pytest.raises(TransportError) as caught:
            await transport.request("POST", f"http://127.0.0.1:{port}/x", [], b"{}")
    finally:
        await transport.aclose()
        server.close()
    assert seen  # the request reached the server
    assert caught.value.maybe_processed is True
    assert str(caught.value).startswith("timeout")
