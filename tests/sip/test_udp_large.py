"""A request too large for RFC 3261 18.1.1's UDP limit still reaches a phone registered
over UDP, over its UDP flow (a NATed phone cannot be connected to), and is counted in
/metrics with the STUN keep-alives answered."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import aiohttp

from sipwake.server import Server
from sipwake.sip.message import Request, Response, make_response, parse_message
from tests.sip.test_transport import read_message, sip_config

TIMEOUT = 10


class Phone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.queue.put_nowait(data)

    async def recv(self) -> bytes:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


def register(port: int) -> bytes:
    return (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-big-reg;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:carol@127.0.0.1>;tag=c1\r\n"
        "To: <sip:carol@127.0.0.1>\r\n"
        "Call-ID: big-reg@phone\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:carol@127.0.0.1:{port}>;expires=600\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def big_message(tcp_port: int, body: bytes) -> bytes:
    return (
        "MESSAGE sip:carol@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{tcp_port};branch=z9hG4bK-big-msg;rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:dave@127.0.0.1>;tag=d1\r\n"
        "To: <sip:carol@127.0.0.1>\r\n"
        "Call-ID: big-msg@sender\r\n"
        "CSeq: 1 MESSAGE\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def metrics(server: Server) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.http_port}/metrics") as resp,
    ):
        return await resp.text()


async def test_large_request_goes_over_the_udp_flow_and_is_counted(tmp_path: Path) -> None:
    server = Server(sip_config(tmp_path, ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]))
    await server.start()
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
    writer = None
    try:
        sip_udp = ("127.0.0.1", server.sip_ports["udp"])
        own = int(udp.get_extra_info("sockname")[1])
        udp.sendto(register(own), sip_udp)
        ok = parse_message(await phone.recv())
        assert isinstance(ok, Response) and ok.status == 200
        # A STUN keep-alive of the phone (RFC 5626 §8), answered and counted.
        udp.sendto(struct.pack("!HHI", 1, 0, 0x2112A442) + os.urandom(12), sip_udp)
        assert struct.unpack_from("!H", await phone.recv())[0] == 0x0101

        body = b"x" * 1500  # over 1300 octets with or without the head
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sip_ports["tcp"])
        tcp_port = int(writer.get_extra_info("sockname")[1])
        writer.write(big_message(tcp_port, body))
        incoming = parse_message(await phone.recv())
        assert isinstance(incoming, Request) and incoming.method == "MESSAGE"
        assert incoming.body == body
        assert incoming.top_via is not None and incoming.top_via.transport == "UDP"
        udp.sendto(make_response(incoming, 200, "OK").to_bytes(), sip_udp)
        answer = parse_message(await read_message(reader))
        assert isinstance(answer, Response) and answer.status == 200

        text = await metrics(server)
        assert "sipwake_sip_transport_udp_over_1300_bytes_total 1.0" in text
        assert "sipwake_sip_transport_stun_answers_total 1.0" in text
    finally:
        if writer is not None:
            writer.close()
        udp.close()
        await server.stop()
