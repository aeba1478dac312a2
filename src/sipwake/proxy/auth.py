"""Digest authentication (RFC 3261 §22, RFC 8760: SHA-256 and MD5, qop=auth).

Only an account's owner may register it, because a binding decides where the account's
calls and pushes go. Nonces are stateless: a timestamp signed with a per-process key, so
any nonce we did not issue is refused and an expired one gets ``stale=true`` (the client
retries with the same password without asking the user). Every comparison of secrets is
constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

from sipwake.clock import Clock, SystemClock
from sipwake.config import Config
from sipwake.sip.message import Request, Response, make_response

#: Algorithms offered, most preferred first (RFC 8760 §2.4: SHA-256 before MD5).
ALGORITHMS: dict[str, str] = {"SHA-256": "sha256", "MD5": "md5"}
NONCE_LIFETIME = 300.0
#: Nonces whose counts are remembered before expired ones are forgotten.
MAX_TRACKED_NONCES = 50_000

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)\s*(?:,|$)')


def parse_digest(value: str) -> dict[str, str] | None:
    """The parameters of a ``Digest`` credentials value, or None when it is not one."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None:
            return None
        raw = m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[m.group(1).lower()] = raw
        pos = m.end()
    return params


def _h(algorithm: str, text: str) -> str:
    return hashlib.new(ALGORITHMS[algorithm], text.encode("utf-8")).hexdigest()


def digest_response(
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str | None = None,
    cnonce: str | None = None,
    qop: str | None = None,
) -> str:
    """The ``response`` value a client computes (RFC 2617 §3.2.2.1, RFC 8760)."""
    ha1 = _h(algorithm, f"{username}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop:
        return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{ha2}")


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Why credentials were refused (the response status and reason to send)."""

    status: int
    reason: str


class Authenticator:
    """Challenges and checks digest credentials against ``[auth] users``."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        key: bytes | None = None,
        nonce_lifetime: float = NONCE_LIFETIME,
    ) -> None:
        self.enabled = config.auth.enabled
        self.realm = config.auth.realm or (config.sip.domains[0] if config.sip.domains else "")
        self.users = dict(config.auth.users)
        self.algorithms = list(config.auth.algorithms)
        self.clock: Clock = clock or SystemClock()
        self._key = key or os.urandom(32)
        self.nonce_lifetime = nonce_lifetime
        # Highest nonce-count accepted per nonce: a captured Authorization cannot be
        # replayed with another Contact while its nonce is still fresh (RFC 7616 §3.3).
        self._counts: dict[str, int] = {}

    # -- nonces
    def make_nonce(self) -> str:
        stamp = f"{self.clock.wall():.3f}".encode()
        mac = hmac.new(self._key, stamp, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(stamp + b":" + mac).decode().rstrip("=")

    def nonce_state(self, nonce: str) -> str:
        """``valid``, ``stale`` (ours but too old) or ``invalid``."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return "invalid"
        stamp, sep, mac = raw.partition(b":")
        if not sep:
            return "invalid"
        good = hmac.new(self._key, stamp, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, good):
            return "invalid"
        try:
            issued = float(stamp)
        except ValueError:
            return "invalid"
        age = self.clock.wall() - issued
        return "valid" if -1.0 <= age <= self.nonce_lifetime else "stale"

    # -- challenge
    def challenges(self, stale: bool = False) -> list[str]:
        """One challenge per algorithm, SHA-256 first, sharing one nonce."""
        nonce = self.make_nonce()
        tail = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", qop="auth", algorithm={alg}{tail}'
            for alg in self.algorithms
        ]

    def challenge(self, request: Request, kind: str, stale: bool = False) -> Response:
        """401 with WWW-Authenticate (``kind`` "www") or 407 with Proxy-Authenticate."""
        status, header = (401, "WWW-Authenticate") if kind == "www" else (407, "Proxy-Authenticate")
        reason = "Unauthorized" if status == 401 else "Proxy Authentication Required"
        response = make_response(request, status, reason)
        for value in self.challenges(stale):
            response.headers.add(header, value)
        return response

    # -- verification
    def verify(self, request: Request, kind: str) -> str | AuthFailure | None:
        """The authenticated user name, an :class:`AuthFailure`, or None (no credentials
        for our realm: challenge). A stale nonce gives ``AuthFailure(0, "stale")``."""
        header = "authorization" if kind == "www" else "proxy-authorization"
        for value in request.headers.get_all(header):
            params = parse_digest(value)
            if params is None or params.get("realm") != self.realm:
                continue
            return self._verify(request, params)
        return None

    def _verify(self, request: Request, p: dict[str, str]) -> str | AuthFailure:
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms:
            return AuthFailure(400, f"Bad Request (unsupported algorithm {algorithm})")
        missing = [k for k in ("username", "nonce", "uri", "response") if not p.get(k)]
        if missing:
            return AuthFailure(400, f"Bad Request (credentials without {missing[0]})")
        qop = p.get("qop")
        if qop is not None and qop.lower() != "auth":
            return AuthFailure(400, f"Bad Request (unsupported qop {qop})")
        if qop and (not p.get("nc") or not p.get("cnonce")):
            return AuthFailure(400, "Bad Request (qop=auth needs nc and cnonce)")
        state = self.nonce_state(p["nonce"])
        if state == "invalid":
            return AuthFailure(0, "invalid")
        password = self.users.get(p["username"])
        # A dummy password keeps the work the same for unknown users.
        expected = digest_response(
            algorithm,
            p["username"],
            self.realm,
            password if password is not None else "\x00",
            request.method,
            p["uri"],
            p["nonce"],
            p.get("nc"),
            p.get("cnonce"),
            qop,
        )
        ok = hmac.compare_digest(expected.encode(), p["response"].lower().encode())
        if not ok or password is None:
            return AuthFailure(403, "Forbidden (wrong user name or password)")
        if state == "stale":
            return AuthFailure(0, "stale")
        if not self._count_once(p["nonce"], p.get("nc") if qop else None):
            return AuthFailure(0, "invalid")  # a replay: challenge again with a new nonce
        return p["username"]

    def _count_once(self, nonce: str, nc: str | None) -> bool:
        """Accept each (nonce, nonce-count) once, counts increasing; without qop a nonce
        serves once."""
        try:
            count = int(nc, 16) if nc is not None else 0
        except ValueError:
            return False
        last = self._counts.get(nonce)
        if last is not None and count <= last:
            return False
        if len(self._counts) >= MAX_TRACKED_NONCES:
            self._counts = {n: c for n, c in self._counts.items() if self.nonce_state(n) == "valid"}
        self._counts[nonce] = count
        return True

    def check(self, request: Request, kind: str) -> str | Response:
        """The user name, or the response to send instead (challenge or refusal)."""
        result = self.verify(request, kind)
        if isinstance(result, str):
            return result
        if result is None or result.reason == "invalid":
            return self.challenge(request, kind)
        if result.reason == "stale":
            return self.challenge(request, kind, stale=True)
        return make_response(request, result.status, result.reason)
