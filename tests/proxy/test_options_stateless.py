"""OPTIONS to the server itself is answered statelessly (RFC 3261 8.2.7), with real sockets.

Phones and peers send an OPTIONS ping every few seconds; the server answers it without a
server transaction, so a retransmission must get the very same answer (same To tag) and
nothing may stay behind. Every other request keeps its server transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.config import parse_config
from sipwake.server import Server
from sipwake.sip.message import Response, parse_message

TIMEOUT = 10


def options(
    branch: str, *, uri: str = "sip:127.0.0.1", transport: str = "UDP", extra: str = ""
) -> bytes:
    return (
        f"OPTIONS {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 192.0.2.10:5999;branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.org>;tag=a1\r\n"
        f"To: <{uri}>\r\n"
        f"Call-ID: {branch}@test\r\n"
        "CSeq: 7 OPTIONS\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def as_response(data: bytes) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.queue.put_nowait(data)

    async def recv(self) -> bytes:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "http": {"listen": "127.0.0.1:0"},
            "sip": {
                "listen": ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"],
                "domains": ["example.org"],
            },
        }
    )
    srv = Server(config)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def peer() -> AsyncIterator[tuple[asyncio.DatagramTransport, Peer]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    yield transport, proto
    transport.close()


async def test_udp_options_ping_is_answered_without_a_transaction_and_retransmits_alike(
    server: Server, peer: tuple[asyncio.DatagramTransport, Peer]
) -> None:
    assert server.sip is not None
    sock, proto = peer
    target = ("127.0.0.1", server.sip_ports["udp"])
    sock.sendto(options("z9hG4bK-ping1"), target)
    first = await proto.recv()
    resp = as_response(first)
    assert resp.status == 200
    assert "REGISTER" in (resp.headers.get("Allow") or "")
    assert resp.headers.get("Supported") == "path"
    # A UAS tags the To of its answer (RFC 3261 8.2.6.2); the rest is copied.
    assert resp.to is not None and resp.to.tag
    assert resp.from_ is not None and resp.from_.tag == "a1"
    assert resp.call_id == "z9hG4bK-ping1@test"
    via = resp.top_via
    assert via is not None and via.params.get("received") == "127.0.0.1"
    assert via.params.get("rport") == str(sock.get_extra_info("sockname")[1])
    # Nothing kept: the retransmission is answered again, byte for byte the same.
    assert len(server.sip.layer) == 0
    sock.sendto(options("z9hG4bK-ping1"), target)
    assert await proto.recv() == first
    # Another ping is another request: another tag.
    sock.sendto(options("z9hG4bK-ping2"), target)
    other = as_response(await proto.recv())
    assert other.status == 200 and other.to is not None
    assert other.to.tag != resp.to.tag
    assert len(server.sip.layer) == 0


async def test_tcp_options_ping_is_answered_over_the_same_connection(server: Server) -> None:
    assert server.sip is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sip_ports["tcp"])
    try:
        writer.write(options("z9hG4bK-tcp1", transport="TCP"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        resp = as_response(head)
        assert resp.status == 200 and resp.to is not None and resp.to.tag
        assert len(server.sip.layer) == 0
    finally:
        writer.close()


async def test_options_for_a_user_or_through_a_route_keeps_its_transaction(
    server: Server, peer: tuple[asyncio.DatagramTransport, Peer]
) -> None:
    """Only OPTIONS for the server itself is stateless: the others go on statefully."""
    assert server.sip is not None
    sock, proto = peer
    target = ("127.0.0.1", server.sip_ports["udp"])
    # A user of our domain that is not registered: answered by the router, statefully.
    sock.sendto(options("z9hG4bK-user1", uri="sip:bob@example.org"), target)
    first = as_response(await proto.recv())
    assert first.status >= 400
    assert len(server.sip.layer) == 1
    # Its retransmission is absorbed by the transaction: the same final answer again.
    sock.sendto(options("z9hG4bK-user1", uri="sip:bob@example.org"), target)
    assert as_response(await proto.recv()).status == first.status
    assert len(server.sip.layer) == 1
