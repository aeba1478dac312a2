"""RFC 8291 / RFC 8188 encryption: the RFC's own example and an independent implementation."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sipwake.push import ece
from sipwake.push.jws import b64url_decode, b64url_encode


def _private(b64: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64url_decode(b64), "big"), ec.SECP256R1())


# RFC 8291 Appendix A.
PLAINTEXT = b"When I grow up, I want to be a watermelon"
AS_PRIVATE = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"
UA_PRIVATE = "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"
AUTH = "BTBZMqHH6r4Tts7J_aSIgg"
SALT = "DGv6ra1nlYgDCS1FRnbzlw"
MESSAGE = (
    "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS"
    "6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qul"
    "cy4a-fN"
)


def test_rfc8291_example_encrypts_exactly() -> None:
    ua = _private(UA_PRIVATE)
    keys = ece.SubscriptionKeys(ece.public_key_bytes(ua.public_key()), b64url_decode(AUTH))
    body = ece.encrypt(PLAINTEXT, keys, sender_key=_private(AS_PRIVATE), salt=b64url_decode(SALT))
    assert b64url_encode(body) == MESSAGE
    assert ece.decrypt(body, ua, keys.auth) == PLAINTEXT


def test_independent_implementation_decrypts_our_payload() -> None:
    http_ece = pytest.importorskip("http_ece")
    ua = ec.generate_private_key(ec.SECP256R1())
    keys = ece.SubscriptionKeys(ece.public_key_bytes(ua.public_key()), b"0123456789abcdef")
    body = ece.encrypt(b'{"call-id":"x"}', keys)
    plain = http_ece.decrypt(body, private_key=ua, auth_secret=keys.auth, version="aes128gcm")
    assert plain == b'{"call-id":"x"}'


def test_tampered_body_and_wrong_keys_are_refused() -> None:
    ua = ec.generate_private_key(ec.SECP256R1())
    keys = ece.SubscriptionKeys(ece.public_key_bytes(ua.public_key()), b"0123456789abcdef")
    body = bytearray(ece.encrypt(b"hello", keys))
    body[-1] ^= 1
    with pytest.raises(ece.EceError, match="does not authenticate"):
        ece.decrypt(bytes(body), ua, keys.auth)
    with pytest.raises(ece.EceError, match="header"):
        ece.decrypt(b"short", ua, keys.auth)


def test_bad_subscription_keys_and_oversized_payload() -> None:
    with pytest.raises(ece.EceError, match="65 bytes"):
        ece.SubscriptionKeys(b"\x04" + b"\x00" * 10, b"0" * 16)
    with pytest.raises(ece.EceError, match="not a P-256"):
        ece.SubscriptionKeys(b"\x04" + b"\x01" * 64, b"0" * 16)
    ua = ec.generate_private_key(ec.SECP256R1())
    keys = ece.SubscriptionKeys(ece.public_key_bytes(ua.public_key()), b"0123456789abcdef")
    with pytest.raises(ece.EceError, match="exceeds"):
        ece.encrypt(b"x" * (ece.MAX_PLAINTEXT + 1), keys)
    assert ece.decrypt(ece.encrypt(b"x" * ece.MAX_PLAINTEXT, keys), ua, keys.auth)
