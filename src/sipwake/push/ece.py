"""Web Push message encryption: RFC 8291 keys over RFC 8188 ``aes128gcm`` records.

Pure functions over bytes. :func:`encrypt` is what the Web Push provider sends;
:func:`decrypt` is the browser's side, used by the simulator and the tests to prove a
payload can be read back with the subscription's private key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LENGTH = 16
NONCE_LENGTH = 12
TAG_LENGTH = 16
SALT_LENGTH = 16
PUBLIC_KEY_LENGTH = 65  # uncompressed P-256 point
DEFAULT_RECORD_SIZE = 4096
# RFC 8291 §4: push services need only accept 4096-byte bodies; one record must fit.
HEADER_LENGTH = SALT_LENGTH + 4 + 1 + PUBLIC_KEY_LENGTH
MAX_PLAINTEXT = DEFAULT_RECORD_SIZE - HEADER_LENGTH - TAG_LENGTH - 1


class EceError(Exception):
    """Keys or a message that cannot be used, with the reason."""


@dataclass(frozen=True, slots=True)
class SubscriptionKeys:
    """A browser subscription's ``p256dh`` public key and ``auth`` secret (raw bytes)."""

    p256dh: bytes
    auth: bytes

    def __post_init__(self) -> None:
        if len(self.p256dh) != PUBLIC_KEY_LENGTH or self.p256dh[0] != 4:
            raise EceError("p256dh must be an uncompressed P-256 point (65 bytes)")
        if len(self.auth) != 16:
            raise EceError("auth must be 16 bytes")
        public_key_from_bytes(self.p256dh)  # rejects points off the curve


def public_key_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """The uncompressed point encoding Web Push uses for P-256 keys."""
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def public_key_from_bytes(data: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError as exc:
        raise EceError(f"not a P-256 public key: {exc}") from None


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA-256 (RFC 5869) for outputs of at most one hash block."""
    prk = _hmac(salt, ikm)
    return _hmac(prk, info + b"\x01")[:length]


def _derive(
    ecdh_secret: bytes, auth: bytes, ua_public: bytes, as_public: bytes, salt: bytes
) -> tuple[bytes, bytes]:
    """RFC 8291 §3.4 then RFC 8188 §2.2: the content-encryption key and base nonce."""
    key_info = b"WebPush: info\x00" + ua_public + as_public
    ikm = _hkdf(auth, ecdh_secret, key_info, 32)
    cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", KEY_LENGTH)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", NONCE_LENGTH)
    return cek, nonce


def _record_nonce(base: bytes, seq: int) -> bytes:
    return (int.from_bytes(base, "big") ^ seq).to_bytes(NONCE_LENGTH, "big")


def encrypt(
    plaintext: bytes,
    keys: SubscriptionKeys,
    *,
    sender_key: ec.EllipticCurvePrivateKey | None = None,
    salt: bytes | None = None,
) -> bytes:
    """Encrypt one push message for a subscription, as a single aes128gcm record.

    A fresh sender key pair and salt are drawn for every message unless given (tests).
    """
    if len(plaintext) > MAX_PLAINTEXT:
        raise EceError(f"payload of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT}")
    sender_key = sender_key or ec.generate_private_key(ec.SECP256R1())
    salt = salt if salt is not None else os.urandom(SALT_LENGTH)
    if len(salt) != SALT_LENGTH:
        raise EceError("salt must be 16 bytes")
    as_public = public_key_bytes(sender_key.public_key())
    secret = sender_key.exchange(ec.ECDH(), public_key_from_bytes(keys.p256dh))
    cek, nonce = _derive(secret, keys.auth, keys.p256dh, as_public, salt)
    record = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    header = salt + struct.pack("!IB", DEFAULT_RECORD_SIZE, len(as_public)) + as_public
    return header + record


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """Decrypt an aes128gcm Web Push body with the subscription's private key."""
    if len(body) < SALT_LENGTH + 5:
        raise EceError("body shorter than the aes128gcm header")
    salt = body[:SALT_LENGTH]
    record_size, id_len = struct.unpack("!IB", body[SALT_LENGTH : SALT_LENGTH + 5])
    start = SALT_LENGTH + 5 + id_len
    as_public = body[SALT_LENGTH + 5 : start]
    if len(as_public) != PUBLIC_KEY_LENGTH or record_size <= TAG_LENGTH + 1:
        raise EceError("bad aes128gcm header (key id or record size)")
    ua_public = public_key_bytes(ua_private.public_key())
    secret = ua_private.exchange(ec.ECDH(), public_key_from_bytes(as_public))
    cek, nonce = _derive(secret, auth, ua_public, as_public, salt)
    aead = AESGCM(cek)
    records = [body[i : i + record_size] for i in range(start, len(body), record_size)]
    if not records:
        raise EceError("no record after the header")
    out = bytearray()
    for seq, record in enumerate(records):
        try:
            plain = aead.decrypt(_record_nonce(nonce, seq), record, None)
        except InvalidTag:
            raise EceError(f"record {seq} does not authenticate") from None
        stripped = plain.rstrip(b"\x00")
        last = seq == len(records) - 1
        if not stripped or stripped[-1] != (2 if last else 1):
            raise EceError(f"record {seq} has a bad padding delimiter")
        out += stripped[:-1]
    return bytes(out)
