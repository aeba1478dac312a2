"""STUN keep-alives on the SIP UDP port (RFC 5626 §8), as a SIP Outbound phone sends them.

The STUN client here is written from RFC 5389 with struct and zlib, independently of
sipwake.sip.stun, and talks to a real UDP listener over real datagrams.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import zlib
from collections.abc import AsyncIterator

import pytest

from sipwake.sip import stun
from sipwake.sip.endpoint import Endpoint, OptionsUser
from sipwake.sip.message import Response, parse_message

TIMEOUT = 10
COOKIE = 0x2112A442


def binding_request(
    tid: bytes, *, fingerprint: bool = False, attributes: bytes = b"", msg_type: int = 0x0001
) -> bytes:
    length = len(attributes) + (8 if fingerprint else 0)
    message = struct.pack("!HHI", msg_type, length, COOKIE) + tid + attributes
    if fingerprint:
        crc = (zlib.crc32(message) ^ 0x5354554E) & 0xFFFFFFFF
        message += struct.pack("!HHI", 0x8028, 4, crc)
    return message


def attributes_of(message: bytes) -> dict[int, bytes]:
    """The attributes of a STUN message, checking the header and the padding as it goes."""
    _, length, cookie = struct.unpack_from("!HHI", message)
    assert cookie == COOKIE and length == len(message) - 20 and length % 4 == 0
    found: dict[int, bytes] = {}
    offset = 20
    while offset < len(message):
        attr, size = struct.unpack_from("!HH", message, offset)
        found[attr] = message[offset + 4 : offset + 4 + size]
        offset += 4 + size + (-size % 4)
    assert offset == len(message)
    return found


def mapped_address(message: bytes, tid: bytes) -> tuple[str, int]:
    """XOR-MAPPED-ADDRESS decoded by hand (RFC 5389 §15.2)."""
    value = attributes_of(message)[0x0020]
    _, family, xport = struct.unpack_from("!BBH", value)
    port = xport ^ (COOKIE >> 16)
    key = struct.pack("!I", COOKIE) + (tid if family == 2 else b"")
    raw = bytes(a ^ b for a, b in zip(value[4:], key, strict=True))
    host = socket.inet_ntop(socket.AF_INET if family == 1 else socket.AF_INET6, raw)
    return host, port


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.queue.put_nowait(data)

    async def recv(self) -> bytes:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(OptionsUser())
    yield ep
    await ep.close()


async def open_peer(host: str) -> tuple[asyncio.DatagramTransport, Peer, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(Peer, local_addr=(host, 0))
    sockname = transport.get_extra_info("sockname")
    return transport, peer, (str(sockname[0]), int(sockname[1]))


def options(port: int, host: str = "127.0.0.1") -> bytes:
    return (
        f"OPTIONS sip:{host} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-stun;rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@{host}>;tag=a1\r\n"
        f"To: <sip:{host}>\r\n"
        "Call-ID: stun-after@test\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("fingerprint", [False, True])
async def test_binding_request_gets_the_source_address_ipv4(
    endpoint: Endpoint, fingerprint: bool
) -> None:
    port = await endpoint.listen("UDP", "127.0.0.1", 0)
    transport, peer, own = await open_peer("127.0.0.1")
    try:
        tid = os.urandom(12)
        transport.sendto(binding_request(tid, fingerprint=fingerprint), ("127.0.0.1", port))
        answer = await peer.recv()
        msg_type, _ = struct.unpack_from("!HH", answer)
        assert msg_type == 0x0101  # Binding success response
        assert answer[8:20] == tid
        assert mapped_address(answer, tid) == own
        attrs = attributes_of(answer)
        assert (0x8028 in attrs) is fingerprint
        if fingerprint:
            # The FINGERPRINT is the CRC-32 of everything before it, XOR 0x5354554e.
            crc = (zlib.crc32(answer[:-8]) ^ 0x5354554E) & 0xFFFFFFFF
            assert struct.unpack("!I", attrs[0x8028])[0] == crc
    finally:
        transport.close()


async def test_binding_request_gets_the_source_address_ipv6(endpoint: Endpoint) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        port = await endpoint.listen("UDP", "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    transport, peer, own = await open_peer("::1")
    try:
        tid = os.urandom(12)
        transport.sendto(binding_request(tid, fingerprint=True), ("::1", port))
        answer = await peer.recv()
        assert struct.unpack_from("!H", answer)[0] == 0x0101
        assert mapped_address(answer, tid) == own
    finally:
        transport.close()


@pytest.mark.parametrize(
    "datagram",
    [
        # A Binding success response, as if we were its client: never answered.
        binding_request(b"r" * 12, msg_type=0x0101),
        # A Binding indication (class 01): no answer by definition.
        binding_request(b"i" * 12, msg_type=0x0011),
        # An Allocate request (TURN): not our usage.
        binding_request(b"t" * 12, msg_type=0x0003),
        # A wrong FINGERPRINT (RFC 5389 §7.3: discarded).
        binding_request(b"f" * 12, fingerprint=True)[:-4] + b"\x00\x00\x00\x00",
        # A length that does not match the datagram.
        binding_request(b"l" * 12) + b"\x00\x00\x00\x00",
        # An attribute that runs past the end.
        struct.pack("!HHI", 1, 8, COOKIE) + b"a" * 12 + struct.pack("!HH", 0x8022, 40) + b"abcd",
        # STUN-shaped with a first octet that is a SIP token character ("!").
        struct.pack("!HHI", 0x2101, 0, COOKIE) + b"x" * 12,
    ],
    ids=["response", "indication", "allocate", "bad-fingerprint", "length", "overrun", "bang"],
)
async def test_other_stun_is_dropped_silently_never_answered_400(
    endpoint: Endpoint, datagram: bytes
) -> None:
    port = await endpoint.listen("UDP", "127.0.0.1", 0)
    transport, peer, own = await open_peer("127.0.0.1")
    try:
        transport.sendto(datagram, ("127.0.0.1", port))
        # Datagrams from one socket are handled in order: the first answer that comes
        # back is the OPTIONS one, so the STUN datagram got none (no 400, no STUN error).
        transport.sendto(options(own[1]), ("127.0.0.1", port))
        first = await peer.recv()
        response = parse_message(first)
        assert isinstance(response, Response) and response.status == 200
        assert response.call_id == "stun-after@test"
    finally:
        transport.close()


async def test_unknown_comprehension_required_attribute_gets_420(endpoint: Endpoint) -> None:
    port = await endpoint.listen("UDP", "127.0.0.1", 0)
    transport, peer, _ = await open_peer("127.0.0.1")
    try:
        tid = os.urandom(12)
        # 0x0024 is PRIORITY (ICE): comprehension-required, and not part of this usage.
        unknown = struct.pack("!HHI", 0x0024, 4, 7)
        # SOFTWARE (0x8022) is comprehension-optional: it must not be listed.
        software = struct.pack("!HH", 0x8022, 5) + b"phone\x00\x00\x00"
        transport.sendto(binding_request(tid, attributes=unknown + software), ("127.0.0.1", port))
        answer = await peer.recv()
        assert struct.unpack_from("!H", answer)[0] == 0x0111  # Binding error response
        attrs = attributes_of(answer)
        _, cls, number = struct.unpack_from("!HBB", attrs[0x0009])
        assert cls * 100 + number == 420
        assert attrs[0x000A] == struct.pack("!H", 0x0024)
    finally:
        transport.close()


def test_a_sip_start_line_is_never_taken_for_stun() -> None:
    for start in (b"OPTIONS sip:a SIP/2.0\r\n", b"\r\nINVITE sip:a SIP/2.0\r\n", b"!x sip:a"):
        assert not stun.is_stun(start + b"\x21\x12\xa4\x42" * 8)
    assert stun.is_stun(binding_request(b"x" * 12))


async def test_an_ipv4_phone_on_a_dual_stack_listener_gets_its_ipv4_address(
    endpoint: Endpoint,
) -> None:
    try:
        port = await endpoint.listen("UDP", "::", 0)
    except OSError:
        pytest.skip("no IPv6 on this host")
    sock = endpoint.transports._udp[0][0].get_extra_info("socket")
    if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        pytest.skip("IPv6 sockets are IPv6-only here (net.ipv6.bindv6only)")
    transport, peer, own = await open_peer("127.0.0.1")
    try:
        tid = os.urandom(12)
        transport.sendto(binding_request(tid), ("127.0.0.1", port))
        answer = await peer.recv()
        # Seen on the socket as ::ffff:127.0.0.1, reported as the IPv4 address it is.
        assert mapped_address(answer, tid) == own
    finally:
        transport.close()
