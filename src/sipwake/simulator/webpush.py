"""A Web Push service look-alike (RFC 8030) that checks VAPID and decrypts payloads.

:meth:`WebPushSimulator.subscribe` plays the browser: it makes a subscription (endpoint
URI, ``p256dh`` key pair, ``auth`` secret), optionally bound to an application server key
as ``PushManager.subscribe({applicationServerKey})`` does. Pushes to it are checked like a
real push service checks them (RFC 8292 VAPID token and key, ``TTL``, ``Urgency``,
``aes128gcm``), answered ``201 Created``, and recorded with their decrypted payload.
"""

from __future__ import annotations

import re
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipwake.clock import Clock, SystemClock
from sipwake.push import ece, jws
from sipwake.simulator.httpsim import HttpSimServer, SimRequest, SimResponse

_PUSH_PATH = re.compile(r"^/push/([A-Za-z0-9_-]+)$")
_VAPID = re.compile(r"^vapid\s+(.+)$", re.IGNORECASE)
URGENCIES = ("very-low", "low", "normal", "high")


@dataclass(slots=True)
class Subscription:
    """What a browser holds for one subscription; ``keys`` is what it gives the server."""

    id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    auth: bytes = field(repr=False)
    application_server_key: str | None = None
    active: bool = True

    @property
    def keys(self) -> ece.SubscriptionKeys:
        return ece.SubscriptionKeys(ece.public_key_bytes(self.private_key.public_key()), self.auth)

    def to_json(self) -> dict[str, object]:
        """As ``PushSubscription.toJSON()``: endpoint and base64url keys."""
        keys = self.keys
        return {
            "endpoint": self.endpoint,
            "keys": {
                "p256dh": jws.b64url_encode(keys.p256dh),
                "auth": jws.b64url_encode(keys.auth),
            },
        }


@dataclass(slots=True)
class ReceivedPush:
    subscription: str
    ttl: int
    urgency: str
    topic: str | None
    payload: bytes | None  # decrypted; None for a push without payload
    vapid_subject: str
    body: bytes = b""  # as received (encrypted)


def write_vapid_key(path: str | Path) -> str:
    """Generate a VAPID P-256 key as PEM (mode 0600); return its public key, base64url."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch(mode=0o600)
    target.write_bytes(pem)
    return jws.b64url_encode(ece.public_key_bytes(key.public_key()))


def _text(status: int, message: str) -> SimResponse:
    return SimResponse(status, [("content-type", "text/plain")], message.encode())


@dataclass(slots=True)
class WebPushSimulator:
    clock: Clock = field(default_factory=SystemClock)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    received: list[ReceivedPush] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer next pushes with
    server: HttpSimServer | None = None

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        http2: bool = False,
    ) -> WebPushSimulator:
        self.server = await HttpSimServer(self.handle, http2=http2, ssl_context=ssl_context).start(
            host, port
        )
        return self

    async def aclose(self) -> None:
        if self.server is not None:
            await self.server.aclose()

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.url

    def subscribe(self, application_server_key: str | None = None) -> Subscription:
        sub_id = secrets.token_urlsafe(16)
        sub = Subscription(
            sub_id,
            f"{self.url}/push/{sub_id}",
            ec.generate_private_key(ec.SECP256R1()),
            secrets.token_bytes(16),
            application_server_key,
        )
        self.subscriptions[sub_id] = sub
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """The browser dropped the subscription: pushes get 410 Gone."""
        sub.active = False

    async def handle(self, req: SimRequest) -> SimResponse:
        path = req.path.split("?", 1)[0]
        match = _PUSH_PATH.match(path)
        if req.method != "POST" or match is None:
            return _text(404, "not a push resource")
        sub = self.subscriptions.get(match.group(1))
        if sub is None:
            return _text(404, "no such subscription")
        if not sub.active:
            return _text(410, "subscription expired")
        subject, problem = self._check_vapid(req, sub)
        if problem:
            return _text(401 if "token" in problem else 403, problem)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return _text(status, "injected failure")
        ttl_text = req.headers.get("ttl", "")
        if not ttl_text.isdigit():
            return _text(400, "TTL header missing or not a number")
        urgency = req.headers.get("urgency", "normal")
        if urgency not in URGENCIES:
            return _text(400, f"bad Urgency {urgency!r}")
        payload: bytes | None = None
        if req.body:
            if req.headers.get("content-encoding", "").lower() != "aes128gcm":
                return _text(415, "payloads must be Content-Encoding: aes128gcm")
            try:
                payload = ece.decrypt(req.body, sub.private_key, sub.auth)
            except ece.EceError as exc:
                return _text(400, f"cannot decrypt: {exc}")
        self.received.append(
            ReceivedPush(
                sub.id, int(ttl_text), urgency, req.headers.get("topic"), payload, subject, req.body
            )
        )
        location = f"{self.url}/message/{secrets.token_urlsafe(12)}"
        return SimResponse(201, [("location", location), ("ttl", ttl_text)])

    def _check_vapid(self, req: SimRequest, sub: Subscription) -> tuple[str, str]:
        """(subject, problem): RFC 8292 checks of the Authorization header."""
        match = _VAPID.match(req.headers.get("authorization", ""))
        if match is None:
            return "", "VAPID token missing (Authorization: vapid t=…, k=…)"
        params: dict[str, str] = {}
        for part in match.group(1).split(","):
            name, _, value = part.strip().partition("=")
            params[name.strip().lower()] = value.strip()
        token, key = params.get("t", ""), params.get("k", "")
        try:
            public = ece.public_key_from_bytes(jws.b64url_decode(key))
            _, claims = jws.verify(token, public)
        except (jws.JwsError, ece.EceError) as exc:
            return "", f"VAPID token invalid: {exc}"
        if sub.application_server_key is not None and key != sub.application_server_key:
            return "", "VAPID key does not match the subscription's applicationServerKey"
        now = self.clock.wall()
        exp = claims.get("exp")
        if claims.get("aud") != self.url:
            return "", f"VAPID token audience {claims.get('aud')!r} is not {self.url}"
        if not isinstance(exp, int) or exp <= now or exp > now + 24 * 3600:
            return "", "VAPID token exp missing, past or more than 24 hours ahead"
        subject = str(claims.get("sub", ""))
        if not subject.startswith(("mailto:", "https:")):
            return "", "VAPID token sub must be a mailto: or https: URL"
        return subject, ""
