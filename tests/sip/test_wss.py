"""SIP over secure WebSocket (RFC 7118 wss://), as a browser softphone on an HTTPS page uses it.

`sipwake serve` runs in this process with a certificate from a private CA; the browser is
aiohttp's WebSocket client trusting that CA, and a second phone talks plain UDP.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipwake.config import ConfigError, advertised_address, parse_config
from sipwake.server import Server
from sipwake.sip.message import Request, Response, make_response, parse_message
from sipwake.sip.tls import client_context
from tests.conftest import free_port
from tests.sip.test_transport import make_ca_and_server_cert, sip_config

TIMEOUT = 10
BROWSER_HOST = "df7jal23ls0d.invalid"  # RFC 7118's example: a browser has no reachable host


class UdpPhone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.queue.put_nowait(data)


def register(port: int) -> str:
    return (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/WSS {BROWSER_HOST};branch=z9hG4bK-wss-reg\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@127.0.0.1>;tag=w1\r\n"
        "To: <sip:alice@127.0.0.1>\r\n"
        "Call-ID: wss-reg@browser\r\n"
        "CSeq: 1 REGISTER\r\n"
        f"Contact: <sip:k3l4m5@{BROWSER_HOST};transport=ws>;expires=600\r\n"
        "Supported: path, outbound\r\n"
        "Content-Length: 0\r\n\r\n"
    )


def request(method: str, udp_port: int, body: bytes = b"") -> bytes:
    return (
        f"{method} sip:alice@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{udp_port};branch=z9hG4bK-wss-{method};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:bob@127.0.0.1>;tag=b1\r\n"
        "To: <sip:alice@127.0.0.1>\r\n"
        f"Call-ID: wss-{method}@phone\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:bob@127.0.0.1:{udp_port}>\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def in_dialog(method: str, cseq: int, udp_port: int, route: str) -> bytes:
    """A request of the phone inside the call the browser answered."""
    return (
        f"{method} sip:k3l4m5@{BROWSER_HOST};transport=ws SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{udp_port};branch=z9hG4bK-wss-{method}{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"Route: {route}\r\n"
        "From: <sip:bob@127.0.0.1>;tag=b1\r\n"
        "To: <sip:alice@127.0.0.1>;tag=browser1\r\n"
        "Call-ID: wss-INVITE@phone\r\n"
        f"CSeq: {cseq} {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def final_answer(phone: UdpPhone) -> Response:
    while True:
        answer = parse_message(await asyncio.wait_for(phone.queue.get(), TIMEOUT))
        assert isinstance(answer, Response)
        if answer.status >= 200:
            return answer


@pytest.fixture
async def wss_server(tmp_path: Path) -> AsyncIterator[tuple[Server, ssl.SSLContext]]:
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    config = sip_config(
        tmp_path,
        ["udp://127.0.0.1:0", "wss://127.0.0.1:0"],
        **{"tls-cert": str(cert_file), "tls-key": str(key_file)},
    )
    server = Server(config)
    await server.start()
    try:
        yield server, client_context(ca_file)
    finally:
        await server.stop()


async def test_register_over_wss_then_a_request_reaches_the_browser_over_that_flow(
    wss_server: tuple[Server, ssl.SSLContext],
) -> None:
    server, trust = wss_server
    wss_port = server.sip_ports["wss"]
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(UdpPhone, local_addr=("127.0.0.1", 0))
    udp_port = int(udp.get_extra_info("sockname")[1])
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"wss://127.0.0.1:{wss_port}/", protocols=("sip",), ssl=trust) as ws,
        ):
            assert ws.protocol == "sip"
            await ws.send_str(register(wss_port))
            ok = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(ok, Response) and ok.status == 200, ok
            assert ok.top_via is not None and ok.top_via.transport == "WSS"
            assert ok.top_via.received == "127.0.0.1"

            # Another phone sends Alice a MESSAGE: it can only reach her over the
            # connection her browser opened.
            sip_udp = ("127.0.0.1", server.sip_ports["udp"])
            udp.sendto(request("MESSAGE", udp_port, b"hello over wss"), sip_udp)
            incoming = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(incoming, Request) and incoming.method == "MESSAGE"
            assert incoming.uri == f"sip:k3l4m5@{BROWSER_HOST};transport=ws"
            assert incoming.body == b"hello over wss"
            top = incoming.top_via
            assert top is not None
            assert (top.transport, top.host, top.port) == ("WSS", "127.0.0.1", wss_port)

            await ws.send_str(make_response(incoming, 200, "OK").to_bytes().decode())
            answer = await final_answer(phone)
            assert answer.status == 200 and answer.call_id == "wss-MESSAGE@phone"

            # A call is record-routed on both sides (RFC 5658); the browser's side names
            # the wss listening point and carries a token for the browser's flow.
            udp_rr = f"<sip:127.0.0.1:{server.sip_ports['udp']};transport=udp;lr>"
            udp.sendto(request("INVITE", udp_port), sip_udp)
            invite = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(invite, Request) and invite.method == "INVITE"
            wss_rr, second = invite.headers.get_all("record-route")
            assert second == udp_rr
            assert wss_rr.startswith("<sip:") and wss_rr.endswith(
                f"@127.0.0.1:{wss_port};transport=wss;lr>"
            )
            ok = make_response(invite, 200, "OK", to_tag="browser1")
            ok.headers.add("Contact", f"<sip:k3l4m5@{BROWSER_HOST};transport=ws>")
            for rr in (wss_rr, udp_rr):
                ok.headers.add("Record-Route", rr)
            await ws.send_str(ok.to_bytes().decode())
            answered = await final_answer(phone)
            assert answered.status == 200 and answered.call_id == "wss-INVITE@phone"

            # The phone hangs up: its BYE follows the route set to us, and the token in
            # our last Route entry takes it into the browser's connection (the browser's
            # Contact host, *.invalid, is nowhere).
            route = ", ".join(reversed(answered.headers.get_all("record-route")))
            udp.sendto(in_dialog("ACK", 1, udp_port, route), sip_udp)
            udp.sendto(in_dialog("BYE", 2, udp_port, route), sip_udp)
            got = [parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())]
            got.append(parse_message((await ws.receive_str(timeout=TIMEOUT)).encode()))
            assert [m.method for m in got if isinstance(m, Request)] == ["ACK", "BYE"]
            bye = got[1]
            assert isinstance(bye, Request)
            assert bye.uri == f"sip:k3l4m5@{BROWSER_HOST};transport=ws"
            assert not bye.routes  # both of ours consumed
            await ws.send_str(make_response(bye, 200, "OK").to_bytes().decode())
            done = await final_answer(phone)
            assert done.status == 200 and done.cseq is not None and done.cseq.method == "BYE"

            # A token whose signature does not match names no flow: the request is not
            # let into the browser's connection (it fails towards the *.invalid host).
            mark = route.index("@127.0.0.1:" + str(wss_port)) - 1
            bad = route[:mark] + ("0" if route[mark] != "0" else "1") + route[mark + 1 :]
            udp.sendto(in_dialog("BYE", 3, udp_port, bad), sip_udp)
            refused = await final_answer(phone)
            assert refused.status >= 400 and refused.cseq is not None
            assert refused.cseq.number == 3
    finally:
        udp.close()


async def test_a_flow_token_names_a_connection_not_an_address(tmp_path: Path) -> None:
    """A browser's call outlives its connection: another client that later connects from
    the same ip:port (behind the same NAT) gets none of that call's requests; the caller
    learns 430 Flow Failed (RFC 5626 §5.2)."""
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    # A second wss listening point: the old connection's port is in TIME_WAIT on our side,
    # so the same ip:port can only connect again to another server port.
    second = free_port()
    config = sip_config(
        tmp_path,
        ["udp://127.0.0.1:0", "wss://127.0.0.1:0", f"wss://127.0.0.1:{second}"],
        **{"tls-cert": str(cert_file), "tls-key": str(key_file)},
    )
    server = Server(config)
    await server.start()
    trust = client_context(ca_file)
    wss_port = server.sip_ports["wss"]
    sip_udp = ("127.0.0.1", server.sip_ports["udp"])
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(UdpPhone, local_addr=("127.0.0.1", 0))
    udp_port = int(udp.get_extra_info("sockname")[1])
    nat_port = free_port()
    url = f"wss://127.0.0.1:{wss_port}/"

    def reusable(addr_info: Any) -> socket.socket:
        # The first connection's port is in TIME_WAIT: a NAT would hand it out again.
        sock = socket.socket(addr_info[0], addr_info[1], addr_info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock

    def same_address() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            local_addr=("127.0.0.1", nat_port), socket_factory=reusable
        )
        return aiohttp.ClientSession(connector=connector)

    try:
        async with (
            same_address() as session,
            session.ws_connect(url, protocols=("sip",), ssl=trust) as ws,
        ):
            await ws.send_str(register(wss_port))
            ok = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(ok, Response) and ok.status == 200, ok
            udp.sendto(request("INVITE", udp_port), sip_udp)
            invite = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(invite, Request) and invite.method == "INVITE"
            answer = make_response(invite, 200, "OK", to_tag="browser1")
            answer.headers.add("Contact", f"<sip:k3l4m5@{BROWSER_HOST};transport=ws>")
            for rr in invite.headers.get_all("record-route"):
                answer.headers.add("Record-Route", rr)
            await ws.send_str(answer.to_bytes().decode())
            answered = await final_answer(phone)
            assert answered.status == 200
        route = ", ".join(reversed(answered.headers.get_all("record-route")))

        # The browser's connection closed; another browser now has its ip:port.
        other_url = f"wss://127.0.0.1:{second}/"
        async with (
            same_address() as session,
            session.ws_connect(other_url, protocols=("sip",), ssl=trust) as other,
        ):
            await other.send_str(register(wss_port).replace("wss-reg@", "wss-reg2@"))
            ok = parse_message((await other.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(ok, Response) and ok.status == 200, ok

            udp.sendto(in_dialog("BYE", 2, udp_port, route), sip_udp)
            failed = await final_answer(phone)
            assert (failed.status, failed.reason) == (430, "Flow Failed")
            assert failed.cseq is not None and failed.cseq.method == "BYE"

            # The next thing the new connection gets is a request for it, not the BYE.
            udp.sendto(request("MESSAGE", udp_port, b"for the new browser"), sip_udp)
            first = parse_message((await other.receive_str(timeout=TIMEOUT)).encode())
            assert isinstance(first, Request) and first.method == "MESSAGE"
            await other.send_str(make_response(first, 200, "OK").to_bytes().decode())
            assert (await final_answer(phone)).status == 200
    finally:
        udp.close()
        await server.stop()


async def test_a_route_user_part_that_is_no_flow_token_gets_an_answer(
    wss_server: tuple[Server, ssl.SSLContext],
) -> None:
    """A Route naming us with a flow-token-like user part of non-ASCII text (one
    unauthenticated datagram) is answered like any request without a flow, and the server
    keeps serving."""
    server, _ = wss_server
    loop = asyncio.get_running_loop()
    udp, phone = await loop.create_datagram_endpoint(UdpPhone, local_addr=("127.0.0.1", 0))
    udp_port = int(udp.get_extra_info("sockname")[1])
    sip_udp = ("127.0.0.1", server.sip_ports["udp"])
    try:
        hostile = "fl0000000000" + "%C3%A9" * 20
        route = f"<sip:{hostile}@127.0.0.1:{server.sip_ports['udp']};lr>"
        udp.sendto(in_dialog("BYE", 7, udp_port, route), sip_udp)
        answer = await final_answer(phone)
        # No flow: the Request-URI's *.invalid host is nowhere.
        assert answer.status == 503 and answer.cseq is not None and answer.cseq.number == 7
        udp.sendto(request("OPTIONS", udp_port), sip_udp)
        served = await final_answer(phone)
        assert served.cseq is not None and served.cseq.method == "OPTIONS"
    finally:
        udp.close()


async def test_plain_websocket_client_cannot_talk_to_a_wss_listener(
    wss_server: tuple[Server, ssl.SSLContext],
) -> None:
    server, _ = wss_server
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            await session.ws_connect(
                f"ws://127.0.0.1:{server.sip_ports['wss']}/", protocols=("sip",)
            )


async def test_wss_listener_without_certificate_is_a_config_error(tmp_path: Path) -> None:
    server = Server(sip_config(tmp_path, ["wss://127.0.0.1:0"]))
    with pytest.raises(ConfigError) as info:
        await server.start()
    await server.stop()
    assert "[sip] tls-cert: a wss:// listener needs tls-cert and tls-key" in str(info.value)


def test_a_wss_listener_on_every_interface_needs_an_advertised_address() -> None:
    listen = {"listen": ["wss://0.0.0.0:7443"], "tls-cert": "c.pem", "tls-key": "k.pem"}
    with pytest.raises(ConfigError) as info:
        parse_config({"sip": listen})
    assert "wss://0.0.0.0:7443 binds every interface" in str(info.value)
    config = parse_config({"sip": {**listen, "advertise": ["wss://sip.example.org:443"]}})
    assert advertised_address(config.sip, "WSS") == ("sip.example.org", 443)
    assert advertised_address(config.sip, "UDP") is None  # that entry is for wss only
