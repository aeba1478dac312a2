"""FCM access-token refresh never holds up pushes while the current token is valid.

The token endpoint here (HTTP/1.1 on 127.0.0.1) holds each answer until the test opens a
gate, so a push that waited for the refresh could not finish before the gate opens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sipwake.clock import FakeClock
from sipwake.push.providers.fcm_auth import AccessTokenManager, ServiceAccount
from sipwake.push.providers.transport import Http1Transport
from sipwake.push.request import PushError


@dataclass
class GatedTokenEndpoint:
    """Answers each token request with ``tok<n>`` once ``gate`` is open."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    fail: bool = False
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                self.arrived.set()
                await self.gate.wait()
                if self.fail:
                    status, body = b"500 Internal Server Error", b'{"error": "down"}'
                else:
                    answer = {"access_token": f"tok{self.requests}", "expires_in": 3600}
                    status, body = b"200 OK", json.dumps(answer).encode()
                writer.write(
                    b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[GatedTokenEndpoint]:
    ep = GatedTokenEndpoint()
    server = await asyncio.start_server(ep.handle, "127.0.0.1", 0)
    ep.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/token"
    yield ep
    server.close()


@pytest.fixture
async def manager(
    endpoint: GatedTokenEndpoint,
) -> AsyncIterator[tuple[AccessTokenManager, FakeClock]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = ServiceAccount("p", "sa@p.iam.example", endpoint.url, key)
    clock = FakeClock()
    transport = Http1Transport()
    mgr = AccessTokenManager(account, transport, clock, anticipation=300)
    yield mgr, clock
    await mgr.aclose()
    await transport.aclose()


async def test_valid_token_is_returned_while_one_refresh_runs_behind(
    endpoint: GatedTokenEndpoint, manager: tuple[AccessTokenManager, FakeClock]
) -> None:
    mgr, clock = manager
    endpoint.gate.set()
    assert await mgr.token() == "tok1"
    clock.advance(3600 - 299)  # past the refresh time, valid 299 s more
    endpoint.gate.clear()
    endpoint.arrived.clear()
    # The token endpoint does not answer: every push still gets the valid token at once
    # (wait_for only guards against a hang; nothing here depends on time).
    values = await asyncio.wait_for(asyncio.gather(*(mgr.token() for _ in range(50))), 10)
    assert set(values) == {"tok1"}
    await endpoint.arrived.wait()
    assert endpoint.requests == 2  # one background refresh for the 50 pushes
    endpoint.gate.set()
    await mgr.wait_refreshed()
    assert await mgr.token() == "tok2"
    assert endpoint.requests == 2


async def test_without_a_valid_token_pushes_wait_for_the_refresh(
    endpoint: GatedTokenEndpoint, manager: tuple[AccessTokenManager, FakeClock]
) -> None:
    mgr, clock = manager
    waiting = [asyncio.ensure_future(mgr.token()) for _ in range(3)]
    await endpoint.arrived.wait()
    assert not any(w.done() for w in waiting)
    endpoint.gate.set()
    assert [await w for w in waiting] == ["tok1"] * 3
    assert endpoint.requests == 1
    clock.advance(3600)  # expired: the next push waits again
    assert await mgr.token() == "tok2"


async def test_failed_background_refresh_keeps_the_valid_token(
    endpoint: GatedTokenEndpoint, manager: tuple[AccessTokenManager, FakeClock]
) -> None:
    mgr, clock = manager
    endpoint.gate.set()
    assert await mgr.token() == "tok1"
    clock.advance(3400)
    endpoint.fail = True
    assert await mgr.token() == "tok1"
    await mgr.wait_refreshed()
    assert "500" in mgr.last_error
    assert await mgr.token() == "tok1"  # no new attempt before the retry interval
    assert endpoint.requests == 2
    clock.advance(200)  # expired, retry interval passed, endpoint still failing
    with pytest.raises(PushError, match="500"):
        await mgr.token()
