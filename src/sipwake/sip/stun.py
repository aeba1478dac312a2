"""STUN keep-alives on the SIP UDP port (RFC 5626 §8, RFC 5389): decoder and encoder.

A phone using SIP Outbound over UDP sends STUN Binding requests to the SIP port and reads
the XOR-MAPPED-ADDRESS of the answer: no answer means the flow is dead (it re-registers),
a changed address means its NAT binding moved. Sans-IO: :func:`answer` takes one datagram
and the address it came from and returns the bytes to send back, or None.

A datagram is STUN when its first two bits are zero and the magic cookie sits at offset 4
(RFC 5389 §6); a SIP message never starts that way (its first octet is a letter, or CR/LF
before a start line). Only Binding requests are answered; every other STUN message
(responses, indications, other methods) and every malformed one is dropped silently.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_SIZE = 20

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
#: XORed into the CRC-32 of FINGERPRINT (RFC 5389 §15.5).
FINGERPRINT_XOR = 0x5354554E

#: Comprehension-required attributes (0x0000-0x7FFF) a Binding request may carry here.
#: USERNAME and MESSAGE-INTEGRITY are understood but not checked: the keep-alive usage has
#: no credentials (RFC 5626 §8: its Binding requests need no attributes), and the answer
#: tells the sender nothing it could not learn from its own packet.
_UNDERSTOOD = frozenset(
    {ATTR_MAPPED_ADDRESS, ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_XOR_MAPPED_ADDRESS}
)


def is_stun(data: bytes) -> bool:
    """True when ``data`` has the shape of a STUN message (RFC 5389 §6), never SIP."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE_BYTES


class StunRequest:
    """What the answer needs from a Binding request."""

    __slots__ = ("fingerprint", "transaction_id", "unknown")

    def __init__(self, transaction_id: bytes, fingerprint: bool, unknown: list[int]) -> None:
        self.transaction_id = transaction_id
        #: The request carried a (valid) FINGERPRINT: the answer carries one too.
        self.fingerprint = fingerprint
        #: Comprehension-required attributes not understood (answered 420, §7.3.1).
        self.unknown = unknown


def parse_binding_request(data: bytes) -> StunRequest | None:
    """The Binding request in ``data``, or None for anything else or anything malformed.

    Checks RFC 5389 §7.3: length a multiple of 4 that matches the datagram, attributes
    that fit exactly, FINGERPRINT (when present) last and correct.
    """
    if not is_stun(data):
        return None
    msg_type, length = struct.unpack_from("!HH", data, 0)
    if msg_type != BINDING_REQUEST or length % 4 or HEADER_SIZE + length != len(data):
        return None
    fingerprint = False
    integrity = False  # after MESSAGE-INTEGRITY only FINGERPRINT counts (§15.4)
    unknown: list[int] = []
    offset = HEADER_SIZE
    end = len(data)
    while offset < end:
        if offset + 4 > end:
            return None
        attr, size = struct.unpack_from("!HH", data, offset)
        value_at = offset + 4
        padded = value_at + size + (-size % 4)
        if padded > end:
            return None
        if attr == ATTR_FINGERPRINT:
            if size != 4 or padded != end:
                return None  # FINGERPRINT is the last attribute (§15.5)
            (crc,) = struct.unpack_from("!I", data, value_at)
            if crc != _crc(data[:offset]):
                return None
            fingerprint = True
        elif integrity:
            pass
        elif attr == ATTR_MESSAGE_INTEGRITY:
            integrity = True
        elif attr < 0x8000 and attr not in _UNDERSTOOD and attr not in unknown:
            unknown.append(attr)
        offset = padded
    return StunRequest(data[8:HEADER_SIZE], fingerprint, unknown)


def _crc(message: bytes) -> int:
    return (zlib.crc32(message) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _attribute(attr: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr, len(value)) + value + b"\x00" * (-len(value) % 4)


def xor_mapped_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """The value of XOR-MAPPED-ADDRESS for ``host``:``port`` (RFC 5389 §15.2)."""
    ip = ipaddress.ip_address(host.partition("%")[0])  # an IPv6 scope id is not sent
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 phone on a dual-stack socket sees itself as IPv4
    xport = port ^ (MAGIC_COOKIE >> 16)
    key = _COOKIE_BYTES if ip.version == 4 else _COOKIE_BYTES + transaction_id
    packed = ip.packed
    xaddr = bytes(a ^ b for a, b in zip(packed, key, strict=True))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, xport) + xaddr


def encode(msg_type: int, transaction_id: bytes, attributes: bytes, fingerprint: bool) -> bytes:
    """A STUN message; with ``fingerprint`` a FINGERPRINT attribute ends it (§15.5)."""
    length = len(attributes) + (8 if fingerprint else 0)
    head = struct.pack("!HHI", msg_type, length, MAGIC_COOKIE) + transaction_id
    message = head + attributes
    if fingerprint:
        message += _attribute(ATTR_FINGERPRINT, struct.pack("!I", _crc(message)))
    return message


def answer(data: bytes, host: str, port: int) -> bytes | None:
    """The answer to a STUN datagram from ``host``:``port``, or None when it gets none.

    A Binding request gets a success response with XOR-MAPPED-ADDRESS set to the source
    address (420 Unknown Attribute when it requires attributes we do not know).
    """
    request = parse_binding_request(data)
    if request is None:
        return None
    tid = request.transaction_id
    if request.unknown:
        reason = b"Unknown Attribute"
        error = struct.pack("!HBB", 0, 4, 20) + reason
        listed = b"".join(struct.pack("!H", a) for a in request.unknown)
        attrs = _attribute(ATTR_ERROR_CODE, error) + _attribute(ATTR_UNKNOWN_ATTRIBUTES, listed)
        return encode(BINDING_ERROR, tid, attrs, request.fingerprint)
    try:
        value = xor_mapped_address(host, port, tid)
    except ValueError:  # not an IP address: nothing to map
        return None
    attrs = _attribute(ATTR_XOR_MAPPED_ADDRESS, value)
    return encode(BINDING_SUCCESS, tid, attrs, request.fingerprint)
