"""Transports with real sockets on 127.0.0.1: UDP, TCP and TLS, as a phone would use them."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sipwake.clock import FakeClock
from sipwake.config import Config, ConfigError, parse_config
from sipwake.server import Server
from sipwake.sip.endpoint import Endpoint, OptionsUser
from sipwake.sip.message import Headers, Request, Response, parse_message
from sipwake.sip.tls import client_context, server_context
from sipwake.sip.transaction import Address, ClientTransaction, ServerTransaction, TimerConfig
from sipwake.sip.transport import TransportConfig, TransportLayer

TIMEOUT = 10


def options(
    branch: str = "z9hG4bK-t1",
    *,
    transport: str = "UDP",
    via_host: str = "127.0.0.1",
    via_port: int = 5999,
    rport: bool = True,
    method: str = "OPTIONS",
    extra: str = "",
    version: str = "SIP/2.0",
) -> bytes:
    rp = ";rport" if rport else ""
    return (
        f"{method} sip:127.0.0.1 {version}\r\n"
        f"Via: SIP/2.0/{transport} {via_host}:{via_port};branch={branch}{rp}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        "To: <sip:127.0.0.1>\r\n"
        f"Call-ID: {branch}@test\r\n"
        f"CSeq: 1 {method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def as_response(data: bytes) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


class Recorder(OptionsUser):
    """The OPTIONS TU that also remembers what reached it."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[Request, Address]] = asyncio.Queue()
        self.responses: asyncio.Queue[tuple[ClientTransaction | None, Response]] = asyncio.Queue()

    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        self.requests.put_nowait((request, source))
        super().on_request(endpoint, txn, request, source)

    def on_response(
        self,
        endpoint: Endpoint,
        txn: ClientTransaction | None,
        response: Response,
        source: Address,
    ) -> None:
        self.responses.put_nowait((txn, response))


class UdpPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.queue.put_nowait((data, addr))

    async def recv(self) -> bytes:
        data, _ = await asyncio.wait_for(self.queue.get(), TIMEOUT)
        return data


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


async def read_message(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT) if length else b""
    return head + body


# --------------------------------------------------------------------------- UDP


async def test_udp_options_gets_200_at_rport_with_received(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, peer_port = udp_peer
    # The phone believes it is 192.0.2.10:5999 (behind NAT); the answer must come back to
    # the address and port the datagram really came from.
    sock.sendto(options(via_host="192.0.2.10"), ("127.0.0.1", port))
    resp = as_response(await peer.recv())
    assert resp.status == 200
    assert "OPTIONS" in (resp.headers.get("Allow") or "")
    assert resp.headers.get("Accept") is not None
    via = resp.top_via
    assert via is not None
    assert via.received == "127.0.0.1"
    assert via.rport == str(peer_port)


async def test_udp_without_rport_and_same_host_keeps_via(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, peer_port = udp_peer
    sock.sendto(options(via_port=peer_port, rport=False), ("127.0.0.1", port))
    via = as_response(await peer.recv()).top_via
    assert via is not None
    assert via.received is None and via.rport is None


async def test_udp_retransmission_is_absorbed_and_answered_again(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, tu = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    sock.sendto(options("z9hG4bK-re"), ("127.0.0.1", port))
    first = await peer.recv()
    sock.sendto(options("z9hG4bK-re"), ("127.0.0.1", port))
    assert await peer.recv() == first
    assert tu.requests.qsize() == 1


async def test_udp_sources_on_many_ports_each_get_their_own_answers(
    server: tuple[Endpoint, Recorder],
) -> None:
    """Phones behind one NAT share a host and differ by port: answers must not mix up."""
    ep, tu = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    peers = [
        await loop.create_datagram_endpoint(UdpPeer, local_addr=("127.0.0.1", 0)) for _ in range(40)
    ]
    try:
        for round_ in range(2):  # the second round: every source seen before
            for n, (sock, _) in enumerate(peers):
                sock.sendto(options(f"z9hG4bK-p{round_}-{n}"), ("127.0.0.1", port))
            for n, (sock, peer) in enumerate(peers):
                resp = as_response(await peer.recv())
                assert resp.status == 200 and resp.call_id == f"z9hG4bK-p{round_}-{n}@test"
                via = resp.top_via
                assert via is not None
                assert via.rport == str(sock.get_extra_info("sockname")[1])
        sources = set()
        while not tu.requests.empty():
            sources.add(tu.requests.get_nowait()[1])
        assert sources == {
            Address("UDP", "127.0.0.1", sock.get_extra_info("sockname")[1]) for sock, _ in peers
        }
    finally:
        for sock, _ in peers:
            sock.close()


@pytest.mark.parametrize(
    ("method", "status"),
    [("REGISTER", 501), ("INVITE", 501), ("MESSAGE", 501), ("FROBNICATE", 501), ("CANCEL", 481)],
)
async def test_methods_not_implemented(
    server: tuple[Endpoint, Recorder],
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
    method: str,
    status: int,
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    sock.sendto(options(method=method), ("127.0.0.1", port))
    statuses = []
    while not statuses or statuses[-1] < 200:  # an INVITE gets 100 Trying first
        statuses.append(as_response(await peer.recv()).status)
    assert statuses[-1] == status


async def test_unknown_uri_scheme_gets_416(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    sock.sendto(
        options().replace(b"OPTIONS sip:127.0.0.1", b"OPTIONS mailto:a@b"), ("127.0.0.1", port)
    )
    assert as_response(await peer.recv()).status == 416


async def test_known_method_not_allowed_for_uri_gets_405_with_allow(
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
) -> None:
    class NoOptionsHere(OptionsUser):
        def allowed_for(self, request: Request) -> frozenset[str]:
            return frozenset({"ACK", "CANCEL"})

    ep = Endpoint(NoOptionsHere())
    try:
        port = await ep.listen("UDP", "127.0.0.1", 0)
        sock, peer, _ = udp_peer
        sock.sendto(options(), ("127.0.0.1", port))
        resp = as_response(await peer.recv())
        assert resp.status == 405
        assert resp.headers.get("Allow") == "ACK, CANCEL"
    finally:
        await ep.close()


@pytest.mark.parametrize(
    ("data", "status", "reason_part"),
    [
        (options(extra="Expires: 10\r\nExpires: 20\r\n"), 400, "expires"),
        (options().replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS"), 400, "CSeq"),
        (options().replace(b"Call-ID", b"X-Nothing"), 400, "call-id"),
        (options(version="SIP/3.0"), 505, "Version"),
        (options(extra="X-Pad: " + "a" * 3000 + "\r\n"), 513, "Too Large"),
    ],
)
async def test_broken_requests_get_precise_errors_and_listener_survives(
    server: tuple[Endpoint, Recorder],
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
    data: bytes,
    status: int,
    reason_part: str,
) -> None:
    ep, tu = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    sock.sendto(data, ("127.0.0.1", port))
    # The answer copies the request's fields, broken ones too: read its status line only.
    status_line = (await peer.recv()).split(b"\r\n", 1)[0].decode()
    version, code, reason = status_line.split(" ", 2)
    assert (version, int(code)) == ("SIP/2.0", status)
    assert reason_part.lower() in reason.lower()
    assert tu.requests.empty()
    sock.sendto(options("z9hG4bK-after"), ("127.0.0.1", port))
    assert as_response(await peer.recv()).status == 200


async def test_broken_response_is_dropped(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ep, tu = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    sock.sendto(b"SIP/2.0 2x0 OK\r\nVia: nonsense\r\n\r\n", ("127.0.0.1", port))
    sock.sendto(b"\r\n\r\n", ("127.0.0.1", port))  # a keep-alive: no answer either
    sock.sendto(options("z9hG4bK-next"), ("127.0.0.1", port))
    resp = as_response(await peer.recv())  # the first thing back answers the OPTIONS
    assert resp.status == 200
    assert tu.responses.empty()


async def test_udp_client_transaction_between_two_endpoints(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("UDP", "127.0.0.1", 0)
    tu = Recorder()
    client = Endpoint(tu)
    try:
        await client.listen("UDP", "127.0.0.1", 0)
        txn = client.send_request(
            build_options(client, "UDP", port), Address("UDP", "127.0.0.1", port)
        )
        got, resp = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
        assert got is txn
        assert resp.status == 200
    finally:
        await client.close()


async def test_udp_answers_leave_from_the_listener_the_request_came_in_on(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    """RFC 3261 18.2.2; and a NAT only lets in what comes from the address it sent to."""
    ep, _ = server
    first = await ep.listen("UDP", "127.0.0.1", 0)
    second = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, _ = udp_peer
    for n, (port, method) in enumerate(
        [(second, "OPTIONS"), (first, "OPTIONS"), (second, "FROBNICATE"), (second, "OPTIONS")]
    ):
        sock.sendto(options(f"z9hG4bK-l{n}", method=method), ("127.0.0.1", port))
        data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
        assert as_response(data).status in (200, 501)
        assert source == ("127.0.0.1", port)


async def test_requests_to_a_peer_leave_from_the_listener_it_was_heard_on(
    server: tuple[Endpoint, Recorder], udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    """A phone registered through the second listener is sent its calls from there."""
    ep, _ = server
    await ep.listen("UDP", "127.0.0.1", 0)
    second = await ep.listen("UDP", "127.0.0.1", 0)
    sock, peer, peer_port = udp_peer
    sock.sendto(options("z9hG4bK-heard"), ("127.0.0.1", second))
    await peer.recv()  # its answer
    ep.send_request(build_options(ep, "UDP", peer_port), Address("UDP", "127.0.0.1", peer_port))
    data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
    assert isinstance(parse_message(data), Request)
    assert source == ("127.0.0.1", second)


async def test_udp_listeners_of_both_families_each_send_to_their_own(
    server: tuple[Endpoint, Recorder],
) -> None:
    """An IPv4 and an IPv6 listener: a request to an IPv6 peer goes out of the IPv6 one."""
    ep, _ = server
    await ep.listen("UDP", "127.0.0.1", 0)
    v6 = await ep.listen("UDP", "::1", 0)
    loop = asyncio.get_running_loop()
    sock, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=("::1", 0))
    try:
        peer_port = sock.get_extra_info("sockname")[1]
        ep.send_request(build_options(ep, "UDP", peer_port), Address("UDP", "::1", peer_port))
        data, source = await asyncio.wait_for(peer.queue.get(), TIMEOUT)
        assert isinstance(parse_message(data), Request)
        assert source[:2] == ("::1", v6)
    finally:
        sock.close()


def build_options(ep: Endpoint, transport: str, port: int) -> Request:
    headers = Headers(
        [
            ("Via", ep.via(transport)),
            ("Max-Forwards", "70"),
            ("From", "<sip:probe@127.0.0.1>;tag=p1"),
            ("To", f"<sip:127.0.0.1:{port}>"),
            ("Call-ID", f"probe-{ep.layer.new_branch()}"),
            ("CSeq", "1 OPTIONS"),
        ]
    )
    return Request("OPTIONS", f"sip:127.0.0.1:{port}", headers)


# --------------------------------------------------------------------------- TCP


async def test_tcp_options_ping_pong_and_request_over_the_same_flow(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, tu = server
    port = await ep.listen("TCP", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n\r\n")  # RFC 5626 keep-alive ping
        assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"
        # Two requests in one write, as a stream may deliver them.
        writer.write(options("z9hG4bK-a", transport="TCP") + options("z9hG4bK-b", transport="TCP"))
        first = as_response(await read_message(reader))
        second = as_response(await read_message(reader))
        assert [first.status, second.status] == [200, 200]
        assert first.top_via is not None and first.top_via.branch == "z9hG4bK-a"
        # Connection reuse: a request the server sends to that flow comes over this socket.
        _, source = await tu.requests.get()
        assert source.transport == "TCP"
        txn = ep.send_request(build_options(ep, "TCP", source.port), source)
        incoming = parse_message(await read_message(reader))
        assert isinstance(incoming, Request) and incoming.method == "OPTIONS"
        from sipwake.sip.message import make_response

        writer.write(make_response(incoming, 200, to_tag="c1").to_bytes())
        got, resp = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
        assert got is txn and resp.status == 200
    finally:
        writer.close()


async def test_tcp_broken_framing_closes_only_that_connection(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("TCP", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(options(transport="TCP").replace(b"Content-Length: 0", b"Content-Length: -1"))
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed by the server
    writer.close()
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    writer2.write(options("z9hG4bK-ok", transport="TCP"))
    assert as_response(await read_message(reader2)).status == 200
    writer2.close()


async def test_idle_connections_are_closed_and_the_limit_is_kept() -> None:
    clock = FakeClock()
    layer = TransportLayer(
        lambda msg, src: None,
        TransportConfig(idle_timeout=30, max_connections=1),
        clock,
    )
    port = await layer.listen("TCP", "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\r\n"
        # Over the limit: the second connection is closed at once.
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader2.read(), TIMEOUT) == b""
        writer2.close()
        clock.advance(29)
        assert layer.sweep_idle() == 0
        clock.advance(2)
        assert layer.sweep_idle() == 1
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    finally:
        await layer.close()


async def test_tcp_client_transaction_opens_a_connection(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("TCP", "127.0.0.1", 0)
    tu = Recorder()
    client = Endpoint(tu)
    try:
        await client.listen("TCP", "127.0.0.1", 0)
        client.send_request(build_options(client, "TCP", port), Address("TCP", "127.0.0.1", port))
        _, resp = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
        assert resp.status == 200
    finally:
        await client.close()


async def test_unreachable_tcp_peer_is_a_transport_error() -> None:
    failed: asyncio.Queue[object] = asyncio.Queue()

    class Tu(OptionsUser):
        def on_transport_error(self, endpoint: Endpoint, txn: object) -> None:
            failed.put_nowait(txn)

    client = Endpoint(Tu())
    try:
        await client.listen("TCP", "127.0.0.1", 0)
        dead = await client.transports.listen("TCP", "127.0.0.1", 0)
        # Close that listener again so the port refuses connections.
        for server_ in client.transports._servers[1:]:
            server_.close()
        txn = client.send_request(
            build_options(client, "TCP", dead), Address("TCP", "127.0.0.1", dead)
        )
        assert await asyncio.wait_for(failed.get(), TIMEOUT) is txn
    finally:
        await client.close()


# --------------------------------------------------------------------------- TLS


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sipwake test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


async def test_tls_listener_and_client_with_a_private_ca(
    server: tuple[Endpoint, Recorder], tmp_path: Path
) -> None:
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    ep, _ = server
    port = await ep.listen("TLS", "127.0.0.1", 0, server_context(cert_file, key_file))
    # A phone connecting with TLS gets its answer over the TLS connection.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(ca_file), server_hostname="127.0.0.1"
    )
    try:
        writer.write(options("z9hG4bK-tls", transport="TLS"))
        assert as_response(await read_message(reader)).status == 200
    finally:
        writer.close()
    # An endpoint that trusts the CA reaches the server as a TLS client.
    tu = Recorder()
    client = Endpoint(tu, client_ssl=client_context(ca_file))
    try:
        client.send_request(build_options(client, "TLS", port), Address("TLS", "127.0.0.1", port))
        _, resp = await asyncio.wait_for(tu.responses.get(), TIMEOUT)
        assert resp.status == 200
    finally:
        await client.close()


async def test_tls_client_refuses_an_untrusted_server(
    server: tuple[Endpoint, Recorder], tmp_path: Path
) -> None:
    _, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    ep, _ = server
    port = await ep.listen("TLS", "127.0.0.1", 0, server_context(cert_file, key_file))
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_ca_and_server_cert(other)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(other_ca), server_hostname="127.0.0.1"
        )


# --------------------------------------------------------------------------- sipwake serve


def sip_config(tmp_path: Path, listen: list[str], **sip: str) -> Config:
    return parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "http": {"listen": "127.0.0.1:0"},
            "sip": {"listen": listen, **sip},
        }
    )


async def test_server_binds_port_zero_for_every_transport_and_reports_it(
    tmp_path: Path, udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int]
) -> None:
    ca_file, cert_file, key_file = make_ca_and_server_cert(tmp_path)
    config = sip_config(
        tmp_path,
        ["udp://127.0.0.1:0", "tcp://127.0.0.1:0", "tls://127.0.0.1:0", "ws://127.0.0.1:0"],
        **{"tls-cert": str(cert_file), "tls-key": str(key_file)},
    )
    server = Server(config)
    await server.start()
    try:
        assert set(server.sip_ports) == {"udp", "tcp", "tls", "ws"}
        assert all(port > 0 for port in server.sip_ports.values())
        sock, peer, _ = udp_peer
        sock.sendto(options(), ("127.0.0.1", server.sip_ports["udp"]))
        assert as_response(await peer.recv()).status == 200
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            server.sip_ports["tls"],
            ssl=client_context(ca_file),
            server_hostname="127.0.0.1",
        )
        writer.write(options("z9hG4bK-srv", transport="TLS"))
        assert as_response(await read_message(reader)).status == 200
        writer.close()
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("listen", "sip", "message"),
    [
        (["sctp://127.0.0.1:5060"], {}, "[sip] listen: expected udp://"),
        (["udp://127.0.0.1"], {}, "[sip] listen: expected host:port"),
        (["tls://127.0.0.1:0"], {}, "[sip] tls-cert: a tls:// listener needs"),
        (["tls://127.0.0.1:0"], {"tls-cert": "no.pem", "tls-key": "no.key"}, "cannot load"),
    ],
)
async def test_server_refuses_sip_config_it_cannot_honour(
    tmp_path: Path, listen: list[str], sip: dict[str, str], message: str
) -> None:
    server = Server(sip_config(tmp_path, listen, **sip))
    with pytest.raises(ConfigError) as info:
        await server.start()
    await server.stop()
    assert message in str(info.value)


async def test_loop_drives_transaction_timers_until_timeout(
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
) -> None:
    timed_out: asyncio.Queue[object] = asyncio.Queue()

    class Tu(OptionsUser):
        def on_timeout(self, endpoint: Endpoint, txn: object) -> None:
            timed_out.put_nowait(txn)

    # A peer that never answers: the request is retransmitted, then Timer F ends it.
    client = Endpoint(Tu(), timers=TimerConfig(t1=0.01, t2=0.04, t4=0.05))
    try:
        await client.listen("UDP", "127.0.0.1", 0)
        _, peer, peer_port = udp_peer
        txn = client.send_request(
            build_options(client, "UDP", peer_port), Address("UDP", "127.0.0.1", peer_port)
        )
        first = await peer.recv()
        assert await peer.recv() == first  # Timer E retransmission, byte for byte
        assert await asyncio.wait_for(timed_out.get(), TIMEOUT) is txn
        assert len(client.layer) == 0
    finally:
        await client.close()


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_options_and_request_back_over_the_flow(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, tu = server
    port = await ep.listen("WS", "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=("sip",)) as ws,
    ):
        assert ws.protocol == "sip"
        await ws.send_str(
            options("z9hG4bK-ws", transport="WS", via_host="df7jal23ls0d.invalid").decode()
        )
        resp = as_response((await ws.receive_str(timeout=TIMEOUT)).encode())
        assert resp.status == 200
        assert resp.top_via is not None and resp.top_via.received == "127.0.0.1"
        _, source = await tu.requests.get()
        assert source.transport == "WS"
        ep.send_request(build_options(ep, "WS", source.port), source)
        incoming = parse_message((await ws.receive_str(timeout=TIMEOUT)).encode())
        assert isinstance(incoming, Request) and incoming.method == "OPTIONS"
        await ws.send_str("garbage\r\n\r\n")  # broken, unanswerable: dropped
        await ws.send_str(options("z9hG4bK-ws2", transport="WS").decode())
        assert as_response((await ws.receive_str(timeout=TIMEOUT)).encode()).status == 200


async def test_websocket_without_sip_subprotocol_is_refused(
    server: tuple[Endpoint, Recorder],
) -> None:
    ep, _ = server
    port = await ep.listen("WS", "127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(f"ws://127.0.0.1:{port}/")
        assert info.value.status == 400


async def test_tcp_response_reopens_a_connection_to_via_when_the_flow_closed() -> None:
    pending: asyncio.Queue[tuple[ServerTransaction, Address]] = asyncio.Queue()

    class Later(OptionsUser):
        def on_request(
            self,
            endpoint: Endpoint,
            txn: ServerTransaction | None,
            request: Request,
            source: Address,
        ) -> None:
            assert txn is not None
            pending.put_nowait((txn, source))

    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def phone_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await read_message(reader))
        writer.close()

    phone = await asyncio.start_server(phone_listener, "127.0.0.1", 0)
    phone_port = phone.sockets[0].getsockname()[1]
    ep = Endpoint(Later())
    try:
        port = await ep.listen("TCP", "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(options("z9hG4bK-late", transport="TCP", via_port=phone_port))
        txn, source = await asyncio.wait_for(pending.get(), TIMEOUT)
        flow = ep.transports.connections[source]
        writer.close()
        await asyncio.wait_for(flow.closed, TIMEOUT)
        ep.respond(txn, 200)
        resp = as_response(await asyncio.wait_for(received.get(), TIMEOUT))
        assert resp.status == 200
        assert resp.top_via is not None and resp.top_via.branch == "z9hG4bK-late"
    finally:
        await ep.close()
        phone.close()


async def test_a_tu_bug_is_answered_500_and_the_listener_goes_on(
    udp_peer: tuple[asyncio.DatagramTransport, UdpPeer, int],
) -> None:
    class Broken(OptionsUser):
        def on_request(
            self,
            endpoint: Endpoint,
            txn: ServerTransaction | None,
            request: Request,
            source: Address,
        ) -> None:
            if request.method == "MESSAGE":
                raise RuntimeError("bug")
            super().on_request(endpoint, txn, request, source)

    ep = Endpoint(Broken())
    try:
        port = await ep.listen("UDP", "127.0.0.1", 0)
        sock, peer, _ = udp_peer
        sock.sendto(options("z9hG4bK-bug", method="MESSAGE"), ("127.0.0.1", port))
        assert as_response(await peer.recv()).status == 500
        sock.sendto(options("z9hG4bK-fine"), ("127.0.0.1", port))
        assert as_response(await peer.recv()).status == 200
    finally:
        await ep.close()
