"""Compact JWS (RFC 7515) signing and checking for RS256 and ES256.

Service-account assertions (RS256, FCM HTTP v1) and VAPID tokens (ES256, RFC 8292) are the
only JWTs sipwake signs; the simulators check them with :func:`verify`. Written on top of
``cryptography`` so no JWT library is needed at run time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)


class JwsError(Exception):
    """A token that is malformed or whose signature does not verify."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as JOSE and Web Push want it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode`; accepts missing padding, rejects garbage."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise JwsError(f"not base64url: {exc}") from None


def _json_part(obj: Mapping[str, Any]) -> str:
    return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())


def sign(
    claims: Mapping[str, Any],
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    header: Mapping[str, Any] | None = None,
) -> str:
    """Sign ``claims``: RS256 with an RSA key, ES256 with a P-256 key."""
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    head = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = f"{_json_part(head)}.{_json_part(claims)}".encode("ascii")
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        if not isinstance(key.curve, ec.SECP256R1):
            raise JwsError("ES256 needs a P-256 key")
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode('ascii')}.{b64url_encode(signature)}"


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, without checking the signature."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwsError("expected three dot-separated parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwsError(f"header or claims are not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwsError("header and claims must be JSON objects")
    return header, claims


def verify(
    token: str, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the signature with ``key`` and return (header, claims)."""
    header, claims = decode_unverified(token)
    head_b64, claims_b64, sig_b64 = token.split(".")
    signing_input = f"{head_b64}.{claims_b64}".encode("ascii")
    signature = b64url_decode(sig_b64)
    alg = header.get("alg")
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if alg != "RS256":
                raise JwsError(f"expected alg RS256, got {alg!r}")
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        else:
            if alg != "ES256":
                raise JwsError(f"expected alg ES256, got {alg!r}")
            if len(signature) != 64:
                raise JwsError("ES256 signature must be 64 bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwsError("signature does not verify") from None
    return header, claims
