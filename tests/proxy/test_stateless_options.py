"""The stateless answer to a keep-alive OPTIONS leaves from the address it was sent to."""

from __future__ import annotations

import asyncio
import socket
import tomllib

import pytest

from sipwake.config import parse_config
from sipwake.proxy.core import ProxyCore
from sipwake.server import make_sip_endpoint
from sipwake.sip.message import Response, parse_message
from sipwake.sip.transport import bracket

TIMEOUT = 10


def can_bind(family: socket.AddressFamily, host: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.queue.put_nowait((data, addr[:2]))


def ping(host: str, port: int, branch: str) -> bytes:
    return (
        "OPTIONS sip:example.org SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {bracket(host)}:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@example.org>;tag=a1\r\n"
        f"To: <sip:example.org>\r\nCall-ID: {branch}@test\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("family", "second"), [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")]
)
async def test_options_to_the_second_udp_listener_is_answered_from_it(
    family: socket.AddressFamily, second: str
) -> None:
    if not can_bind(family, second):
        pytest.skip(f"cannot bind {second} here")
    config = parse_config(tomllib.loads('[sip]\ndomains = ["example.org"]\n'))
    # OPTIONS to the server itself needs neither the registrar nor the router.
    core = ProxyCore(config, None, None)  # type: ignore[arg-type]
    endpoint = make_sip_endpoint(config, core)
    loop = asyncio.get_running_loop()
    try:
        first_port = await endpoint.listen("UDP", "127.0.0.1", 0)
        second_port = await endpoint.listen("UDP", second, 0)
        for host, port in (("127.0.0.1", first_port), (second, second_port)):
            sock, peer = await loop.create_datagram_endpoint(
                Peer, local_addr=("::1" if ":" in host else "127.0.0.1", 0)
            )
            try:
                local = sock.get_extra_info("sockname")
                sock.sendto(ping(local[0], local[1], f"z9hG4bK-{port}"), (host, port))
                data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
            finally:
                sock.close()
            answer = parse_message(data)
            assert isinstance(answer, Response) and answer.status == 200
            assert answer.to is not None and answer.to.tag  # the stateless answer
            assert source == (host, port)
    finally:
        await endpoint.close()
