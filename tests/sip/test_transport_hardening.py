"""Transports against hostile or broken peers: real sockets on 127.0.0.1, fake clocks.

Forged responses, forged ``received``, ACKs that must never be answered, exceptions that
must not stop the timers, WebSocket limits, host names, connection limits, advertised
addresses and the stream framer's work on drip-fed input.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipwake.clock import FakeClock
from sipwake.config import ConfigError, parse_config
from sipwake.server import Server
from sipwake.sip.endpoint import Endpoint, OptionsUser, TransactionUser
from sipwake.sip.message import Headers, Request, StreamFramer, make_response, parse_message
from sipwake.sip.transaction import Address, Transaction
from sipwake.sip.transport import (
    TransportConfig,
    TransportLayer,
    fill_via,
    reconnect_address,
)

from .test_transport import (
    TIMEOUT,
    Recorder,
    UdpPeer,
    as_response,
    build_options,
    options,
    read_message,
)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Endpoint, Recorder]]:
    tu = Recorder()
    ep = Endpoint(tu, transport_config=TransportConfig(max_message_size=2048))
    yield ep, tu
    await ep.close()


@pytest.fixture
async def udp_peer() -> AsyncIterator[tuple[asyncio.DatagramTransport, UdpPeer, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(UdpPeer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield transport, proto, port
    transport.close()


def response_text(via: str, call_id: str = "r@x") -> bytes:
    return (
        "SIP/2.0 200 OK\r\n"
        f"Via: {via}\r\n"
        "From: <sip:a@127.0.0.1>;tag=1\r\n"
        "To: <sip:b@127.0.0.1>;tag=2\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def parsed_request(via: str, method: str = "OPTIONS") -> Request:
    msg = parse_message(
        (
            f"{method} sip:bob@127.0.0.1 SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
            "To: <sip:bob@127.0.0.1>\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nCall-ID: x\r\n"
            f"CSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(msg, Request)
    return msg


def fake_resolver(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Resolve ``name`` to 127.0.0.1 on the running loop, without DNS; returns the log."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked: list[str] = []

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == name:
            asked.append(host)
            kind = kw.get("type") or socket.SOCK_STREAM
            return [(socket.AF_INET, kind, 0, "", ("127.0.0.1", int(port)))]
        return await real(host, port, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return asked


# --------------------------------------------------------------------------- responses


async def test_response_whose_top_via_is_not_ours_is_dropped(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, tu = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, _, _ = udp_peer
    # RFC 3261 18.1.2: the top Via names someone else: not for us, never forwarded.
    sock.sendto(
        response_text("SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bKx", "forged"), ("127.0.0.1", port)
    )
    sock.sendto(
        response_text(f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKy", "ours"), ("127.0.0.1", port)
    )
    _, first = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
    assert first.call_id == "ours"  # datagrams on loopback keep their order
    assert tu.responses.empty()


async def test_response_to_an_advertised_address_is_ours(
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
) -> None:
    tu = Recorder()
    ep = Endpoint(tu)
    try:
        port = await ep.listen("UDP", "127.0.0.1", 0, advertise=("sip.example.org", 5080))
        sock, _, _ = udp_peer
        via = "SIP/2.0/UDP sip.example.org:5080;branch=z9hG4bKadv"
        sock.sendto(response_text(via, "adv"), ("127.0.0.1", port))
        _, first = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
        assert first.call_id == "adv"
        assert ep.transports.is_own_sent_by("UDP", "127.0.0.1", port)
        assert not ep.transports.is_own_sent_by("UDP", "127.0.0.1", port + 1)
    finally:
        await ep.close()


async def test_send_without_connect_never_opens_a_connection() -> None:
    accepted: list[object] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.close()

    victim = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    victim_port = victim.sockets[0].getsockname()[1]
    layer = TransportLayer(lambda msg, src: None)
    errors: list[bool] = []
    try:
        await layer.listen("TCP", "127.0.0.1", 0)
        layer.send(
            b"SIP/2.0 200 OK\r\n\r\n",
            Address("TCP", "127.0.0.1", victim_port),
            lambda: errors.append(True),
            connect=False,
        )
        assert errors == [True]  # refused at once: nothing pending, nothing connecting
        assert layer._pending == {} and layer._tasks == set()
    finally:
        await layer.close()
        victim.close()
        await victim.wait_closed()
    assert accepted == []


# --------------------------------------------------------------------------- received


def test_client_supplied_received_is_replaced_by_the_source() -> None:
    req = parsed_request("SIP/2.0/TCP 198.51.100.7:5060;branch=z9hG4bKa;received=10.0.0.5")
    fill_via(req, "198.51.100.7", 40000)
    via = req.top_via
    assert via is not None and via.received is None  # sent-by is the source: none needed
    req = parsed_request("SIP/2.0/TCP 198.51.100.7:5060;branch=z9hG4bKa;received=10.0.0.5")
    fill_via(req, "192.0.2.1", 40000)
    assert req.top_via is not None and req.top_via.received == "192.0.2.1"
    assert "10.0.0.5" not in req.to_bytes().decode()
    req = parsed_request("SIP/2.0/UDP host.invalid;branch=z9hG4bKa;rport=1;received=10.0.0.5")
    fill_via(req, "192.0.2.1", 40000)
    assert req.top_via is not None
    assert (req.top_via.received, req.top_via.rport) == ("192.0.2.1", "40000")


def test_reconnect_goes_to_the_flow_peer_not_to_a_forged_received() -> None:
    req = parsed_request("SIP/2.0/TCP 198.51.100.7:5070;branch=z9hG4bKa;received=10.0.0.5")
    fill_via(req, "198.51.100.7", 40000)
    resp = make_response(req, 487)
    target = reconnect_address(resp, Address("TCP", "198.51.100.7", 40000))
    assert target == Address("TCP", "198.51.100.7", 5070)
    # Even a response carrying a forged received (built elsewhere) goes to the peer.
    resp.headers.set("Via", "SIP/2.0/TCP 198.51.100.7:5070;branch=z9hG4bKa;received=10.0.0.5")
    target = reconnect_address(resp, Address("TCP", "198.51.100.7", 40000))
    assert target is not None and target.host == "198.51.100.7"


# --------------------------------------------------------------------------- ACK


async def test_ack_is_never_answered_and_max_forwards_is_optional(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, peer_port = udp_peer
    missing_call_id = options("z9hG4bK-ack1", method="ACK", via_port=peer_port).replace(
        b"Call-ID: z9hG4bK-ack1@test\r\n", b""
    )
    sock.sendto(missing_call_id, ("127.0.0.1", port))
    bad_cseq = options("z9hG4bK-ack2", method="ACK", via_port=peer_port).replace(
        b"CSeq: 1 ACK", b"CSeq: x ACK"
    )
    sock.sendto(bad_cseq, ("127.0.0.1", port))
    # A request without Max-Forwards is accepted (a proxy adds 70, RFC 3261 16.6 step 3).
    no_max_forwards = options("z9hG4bK-nomf", via_port=peer_port).replace(
        b"Max-Forwards: 70\r\n", b""
    )
    sock.sendto(no_max_forwards, ("127.0.0.1", port))
    first = as_response(await peer.recv())
    assert (first.status, first.call_id) == (200, "z9hG4bK-nomf@test")


async def test_broken_ack_over_tcp_gets_no_answer(server: tuple[Endpoint, Recorder]) -> None:
    ep, _ = server
    port = await ep.listen("TCP", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        broken = options("z9hG4bK-tack", method="ACK", transport="TCP").replace(
            b"CSeq: 1 ACK", b"CSeq: 1 INVITE"
        )
        writer.write(broken)
        writer.write(options("z9hG4bK-tcp-after", transport="TCP"))
        answer = as_response(await read_message(reader))
        assert (answer.status, answer.call_id) == (200, "z9hG4bK-tcp-after@test")
    finally:
        writer.close()


# --------------------------------------------------------------------------- timers


def options_to(ep: Endpoint, call_id: str, port: int = 9) -> Request:
    h = Headers(
        [
            ("Via", ep.via("UDP")),
            ("Max-Forwards", "70"),
            ("From", "<sip:a@127.0.0.1>;tag=1"),
            ("To", "<sip:b@127.0.0.1>"),
            ("Call-ID", call_id),
            ("CSeq", "1 OPTIONS"),
        ]
    )
    return Request("OPTIONS", f"sip:b@127.0.0.1:{port}", h)


async def test_a_tu_exception_on_timeout_loses_no_other_timeout() -> None:
    seen: list[str | None] = []

    class Tu(TransactionUser):
        def on_timeout(self, endpoint: Endpoint, txn: Transaction) -> None:
            seen.append(txn.request.call_id)
            if txn.request.call_id == "first":
                raise RuntimeError("TU bug")

    clock = FakeClock()
    ep = Endpoint(Tu(), clock=clock)
    try:
        await ep.listen("UDP", "127.0.0.1", 0)
        for call_id in ("first", "second"):
            ep.send_request(options_to(ep, call_id), Address("UDP", "127.0.0.1", 9))
        clock.advance(40)  # past Timer F
        ep._fire()
        assert seen == ["first", "second"]
        ep.send_request(options_to(ep, "third"), Address("UDP", "127.0.0.1", 9))
        assert ep._timer is not None  # the timer still runs for later transactions
    finally:
        await ep.close()


async def test_a_failing_send_is_a_transport_error_and_the_others_go_on(
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
) -> None:
    failed: list[str | None] = []

    class Tu(TransactionUser):
        def on_transport_error(self, endpoint: Endpoint, txn: Transaction) -> None:
            failed.append(txn.request.call_id)

    ep = Endpoint(Tu(), clock=FakeClock())
    try:
        await ep.listen("UDP", "127.0.0.1", 0)
        udp = ep.transports._udp[0][0]
        real_sendto = udp.sendto

        def sendto(data: bytes, addr: Any = None) -> None:
            if b"Call-ID: broken" in data:
                raise ValueError("uvloop refuses this address")
            real_sendto(data, addr)

        udp.sendto = sendto  # type: ignore[method-assign]
        _, peer, peer_port = udp_peer
        ep.send_request(options_to(ep, "broken", peer_port), Address("UDP", "127.0.0.1", peer_port))
        ep.send_request(options_to(ep, "fine", peer_port), Address("UDP", "127.0.0.1", peer_port))
        assert b"Call-ID: fine" in await peer.recv()
        assert failed == ["broken"]
        assert ep._timer is not None
    finally:
        await ep.close()


async def test_udp_to_a_host_name_is_resolved_without_blocking(
    monkeypatch: pytest.MonkeyPatch, udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    asked = fake_resolver(monkeypatch, "phone.sip.test")
    ep = Endpoint(TransactionUser())
    try:
        await ep.listen("UDP", "127.0.0.1", 0)
        _, peer, peer_port = udp_peer
        ep.send_request(
            options_to(ep, "named", peer_port), Address("UDP", "phone.sip.test", peer_port)
        )
        assert b"Call-ID: named" in await peer.recv()
        assert asked == ["phone.sip.test"]
    finally:
        await ep.close()


# --------------------------------------------------------------------------- connections


async def test_sends_to_a_host_name_reuse_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_resolver(monkeypatch, "proxy.sip.test")
    received: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                received.put_nowait((number, await read_message(reader)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    peer = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = peer.sockets[0].getsockname()[1]
    ep = Endpoint(TransactionUser())
    try:
        target = Address("TCP", "proxy.sip.test", port)
        ep.send_request(options_to(ep, "one", port), target)
        first = await asyncio.wait_for(received.get(), TIMEOUT)
        ep.send_request(options_to(ep, "two", port), target)
        second = await asyncio.wait_for(received.get(), TIMEOUT)
        assert [first[0], second[0]] == [1, 1]
        assert len(ep.transports.connections) == 1
    finally:
        await ep.close()
        peer.close()
        await peer.wait_closed()


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(2), TIMEOUT)
    except ConnectionError:
        return b""


async def test_one_address_cannot_take_every_connection_slot() -> None:
    layer = TransportLayer(
        lambda msg, src: None, TransportConfig(max_connections=1000, max_connections_per_ip=2)
    )
    port = await layer.listen("TCP", "127.0.0.1", 0)
    conns = []
    try:
        for _ in range(3):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        answers = [await ping(r, w) for r, w in conns]
        assert answers == [b"\r\n", b"\r\n", b""]  # the third is closed at once
        local_port = conns[0][1].get_extra_info("sockname")[1]
        flow = layer.connections[Address("TCP", "127.0.0.1", local_port)]
        conns[0][1].close()
        await asyncio.wait_for(flow.closed, TIMEOUT)  # the server saw the close
        conns.append(await asyncio.open_connection("127.0.0.1", port))
        assert await ping(*conns[-1]) == b"\r\n"  # a freed slot is usable again
    finally:
        for _, writer in conns:
            writer.close()
        await layer.close()


async def test_slots_are_kept_for_outgoing_connections() -> None:
    incoming = TransportLayer(
        lambda msg, src: None,
        TransportConfig(max_connections=10, outgoing_reserve=1, max_connections_per_ip=100),
    )
    port = await incoming.listen("TCP", "127.0.0.1", 0)
    other = TransportLayer(lambda msg, src: None)
    other_port = await other.listen("TCP", "127.0.0.1", 0)
    conns = []
    try:
        for _ in range(10):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        answers = [await ping(r, w) for r, w in conns]
        assert answers == [b"\r\n"] * 9 + [b""]  # incoming stop one short of the limit
        flow = await incoming.connect(Address("TCP", "127.0.0.1", other_port))
        assert flow.is_open()  # an outgoing connection still gets the reserved slot
    finally:
        for _, writer in conns:
            writer.close()
        await incoming.close()
        await other.close()


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_message_over_the_size_limit_closes_the_connection(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server  # max-message-size 2048
    port = await ep.listen("WS", "127.0.0.1", 0)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=("sip",)) as ws,
    ):
        big = options("z9hG4bK-big", transport="WS", extra=f"X-Pad: {'a' * 4096}\r\n")
        await ws.send_bytes(big)
        msg = await ws.receive(timeout=TIMEOUT)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_websocket_compression_is_not_negotiated(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("WS", "127.0.0.1", 0)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=("sip",), compress=15) as ws,
    ):
        assert ws.compress == 0  # no permessage-deflate: nothing inflates past the limit


async def test_websocket_answers_non_utf8_in_a_binary_frame_and_pings(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("WS", "127.0.0.1", 0)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{port}/", protocols=("sip",)) as ws,
    ):
        latin1 = options("z9hG4bK-l1", transport="WS").replace(
            b"From: <sip:alice", b'From: "Jos\xe9" <sip:alice'
        )
        await ws.send_bytes(latin1)
        msg = await ws.receive(timeout=TIMEOUT)
        assert msg.type is aiohttp.WSMsgType.BINARY
        answer = as_response(msg.data)
        assert answer.status == 200 and b"Jos\xe9" in msg.data
        await ws.send_str("\r\n\r\n")  # RFC 5626 keep-alive, as over TCP
        assert await ws.receive_str(timeout=TIMEOUT) == "\r\n"
        await ws.send_str(options("z9hG4bK-utf", transport="WS").decode())
        assert as_response((await ws.receive_str(timeout=TIMEOUT)).encode()).status == 200


# --------------------------------------------------------------------------- framer


class CountingBuffer(bytearray):
    """A framer buffer that counts the octets each search looks at."""

    looked_at = 0

    def find(self, sub: Any, start: Any = None, *args: Any) -> int:  # type: ignore[override]
        CountingBuffer.looked_at += len(self) - (start or 0)
        return super().find(sub, start or 0, *args)


def test_framer_does_linear_work_on_drip_fed_input() -> None:
    framer = StreamFramer()
    framer._buf = CountingBuffer()
    CountingBuffer.looked_at = 0
    data = options("z9hG4bK-drip", extra=f"X-Pad: {'a' * 20000}\r\n")
    events = []
    for i in range(len(data)):
        events += framer.feed(data[i : i + 1])
    assert len(events) == 1 and isinstance(events[0], Request)
    # A rescan from the start on every octet would look at ~len²/2 = 200 million octets.
    assert CountingBuffer.looked_at < 8 * len(data)


def test_framer_finds_a_head_end_split_across_reads_at_every_point() -> None:
    data = options("z9hG4bK-split") + b"\r\n\r\n" + options("z9hG4bK-split2")
    for cut in range(1, len(data)):
        framer = StreamFramer()
        events = framer.feed(data[:cut]) + framer.feed(data[cut:])
        kinds = [type(e).__name__ for e in events]
        assert kinds == ["Request", "KeepAlivePing", "Request"], (cut, kinds)


# --------------------------------------------------------------------------- advertised


async def test_via_shows_the_advertised_address_and_brackets_ipv6() -> None:
    ep = Endpoint(TransactionUser())
    try:
        port = await ep.listen("UDP", "127.0.0.1", 0, advertise=("2001:db8::5", None))
        assert ep.via("UDP").startswith(f"SIP/2.0/UDP [2001:db8::5]:{port};branch=z9hG4bK")
        await ep.listen("TCP", "127.0.0.1", 0, advertise=("sip.example.org", 5060))
        assert ep.via("TCP").startswith("SIP/2.0/TCP sip.example.org:5060;")
        request = build_options(ep, "UDP", port)
        assert request.top_via is not None and request.top_via.host == "[2001:db8::5]"
    finally:
        await ep.close()


def test_wildcard_bind_without_advertised_address_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sip": {"listen": ["udp://0.0.0.0:5060"]}})
    assert "[sip] advertise" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"sip": {"listen": ["tcp://[::]:5060"], "advertise": ["udp://a.example"]}})
    assert "[sip] advertise" in str(info.value)
    ok = parse_config({"sip": {"listen": ["udp://0.0.0.0:5060"], "advertise": ["sip.example.org"]}})
    assert ok.sip.advertise == ["sip.example.org"]
    parse_config(
        {"sip": {"listen": ["tcp://[::]:5060"], "advertise": ["tcp://[2001:db8::1]:5070"]}}
    )


@pytest.mark.parametrize(
    "value",
    ["0.0.0.0", "2001:db8::1", "sctp://a.example", "a.example:99999", "[2001:db8::1", "a b"],
)
def test_malformed_advertised_address_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"sip": {"advertise": [value]}})
    assert "[sip] advertise" in str(info.value)


async def test_server_advertises_the_configured_address(tmp_path: Path) -> None:
    config = parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "http": {"listen": ""},
            "sip": {
                "listen": ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"],
                "advertise": ["sip.example.org", "tcp://sip.example.org:5070"],
            },
        }
    )
    server = Server(config)
    await server.start()
    try:
        assert server.sip is not None
        assert f"sip.example.org:{server.sip_ports['udp']};" in server.sip.via("UDP")
        assert "sip.example.org:5070;" in server.sip.via("TCP")
    finally:
        await server.stop()


def test_tu_default_advertises_nothing() -> None:
    assert OptionsUser().advertised_address("UDP", "127.0.0.1") is None


# --------------------------------------------------------------------------- flow control


async def connected_pair(
    layer: TransportLayer, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A client connection with small socket buffers, and the server's side of it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    client_sock = writer.get_extra_info("socket")
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert await ping(reader, writer) == b"\r\n"  # the server has registered it
    flow = layer.connections[Address("TCP", "127.0.0.1", client_sock.getsockname()[1])]
    flow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return reader, writer, flow


def many_options(count: int) -> bytes:
    return b"".join(
        options(f"z9hG4bK-fc{i}", transport="TCP", extra=f"X-Pad: {'p' * 200}\r\n")
        for i in range(count)
    )


async def test_a_peer_that_does_not_read_is_not_read_either() -> None:
    tu = OptionsUser()
    ep = Endpoint(tu, transport_config=TransportConfig(write_buffer_high=8192))
    port = await ep.listen("TCP", "127.0.0.1", 0)
    try:
        reader, writer, flow = await connected_pair(ep.transports, port)
        paused = asyncio.Event()
        pause = flow.pause_writing

        def pause_writing() -> None:
            pause()
            paused.set()

        flow.pause_writing = pause_writing
        count = 400
        writer.write(many_options(count))
        await asyncio.wait_for(paused.wait(), TIMEOUT)
        assert not flow.transport.is_reading()  # no more requests from it for now
        answers = [as_response(await read_message(reader)) for _ in range(count)]
        assert [a.call_id for a in answers] == [f"z9hG4bK-fc{i}@test" for i in range(count)]
        writer.close()
    finally:
        await ep.close()


async def test_a_connection_whose_backlog_passes_the_limit_is_closed() -> None:
    config = TransportConfig(write_buffer_high=1 << 20, max_write_buffer=16384)
    ep = Endpoint(OptionsUser(), transport_config=config)
    port = await ep.listen("TCP", "127.0.0.1", 0)
    try:
        _, writer, flow = await connected_pair(ep.transports, port)
        writer.write(many_options(400))
        await asyncio.wait_for(flow.closed, TIMEOUT)
        assert flow not in ep.transports.connections.values()
        writer.close()
    finally:
        await ep.close()


def test_endpoint_branches_are_unpredictable() -> None:
    ep = Endpoint(TransactionUser())
    first, second = ep.layer.new_branch(), ep.layer.new_branch()
    other = Endpoint(TransactionUser()).layer.new_branch()
    assert first.startswith("z9hG4bK") and first != second
    # Neither the next counter value nor another endpoint's prefix can be guessed.
    assert second.split(".")[-1] != "2" and first.split(".")[0] != other.split(".")[0]
    assert len(second.split(".")[-1]) > 8
