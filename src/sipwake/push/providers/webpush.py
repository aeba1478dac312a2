"""Web Push (RFC 8030) with VAPID (RFC 8292) and, when keys are known, RFC 8291 payloads.

RFC 8599 ``pn-provider=webpush`` gives the push subscription URI as ``pn-prid``. Without
the subscription's ``p256dh``/``auth`` keys the push carries no payload: the service worker
wakes and asks the server. With them (given in a ``/v1/push`` item, which calls
:meth:`WebPushProvider.set_subscription_keys`; the most recently used ``MAX_KEYS``
subscriptions are remembered) the data keys of the FCM message, the message ``text``
included, are sent encrypted as ``aes128gcm``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipwake.clock import Clock, SystemClock
from sipwake.config import Config
from sipwake.push import ece, jws
from sipwake.push.providers.fcm import data_fields
from sipwake.push.providers.transport import (
    Backoff,
    HttpResponse,
    HttpTransport,
    InFlight,
    TransportError,
    make_transport,
    retry_after,
    ssl_context,
)
from sipwake.push.request import (
    Destination,
    Outcome,
    Provider,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
)

log = logging.getLogger(__name__)

MAX_KEYS = 10000  # subscriptions whose keys are remembered (least recently used dropped)
VAPID_LIFETIME = 12 * 3600  # RFC 8292 §2: at most 24 hours
RETRYABLE = frozenset({429, 500, 502, 503, 504})
URGENT = frozenset({PushKind.CALL, PushKind.RINGING})
_TOPIC = re.compile(r"[A-Za-z0-9_-]{1,32}")  # RFC 8030 §5.4: base64url, at most 32

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class VapidKey:
    """The application server's P-256 key pair and subject (``mailto:`` or ``https:``)."""

    private_key: ec.EllipticCurvePrivateKey
    subject: str

    def __post_init__(self) -> None:
        if not isinstance(self.private_key.curve, ec.SECP256R1):
            raise PushError("VAPID key must be a P-256 (prime256v1) key")
        if not self.subject.startswith(("mailto:", "https:")):
            raise PushError(f"VAPID subject must be a mailto: or https: URL: {self.subject!r}")

    @classmethod
    def from_pem(cls, data: bytes, subject: str, source: str = "VAPID key") -> VapidKey:
        """From PEM bytes (a stored credential); the error names ``source``, never the key."""
        try:
            key = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError):
            raise PushError(f"{source}: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PushError(f"{source}: VAPID key must be an EC P-256 key")
        return cls(key, subject)

    @classmethod
    def load(cls, path: str | Path, subject: str) -> VapidKey:
        """Read a PEM private key file."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PushError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.from_pem(data, subject, str(path))

    @property
    def public_key_b64(self) -> str:
        """The key as browsers want it (``applicationServerKey``, RFC 8599 ``+sip.vapid``)."""
        return jws.b64url_encode(ece.public_key_bytes(self.private_key.public_key()))

    def token(self, audience: str, now_wall: float) -> str:
        claims = {"aud": audience, "exp": int(now_wall) + VAPID_LIFETIME, "sub": self.subject}
        return jws.sign(claims, self.private_key)


def audience_of(endpoint: str) -> str:
    """The origin of a push resource, the VAPID ``aud`` (default port omitted)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise PushError("pn-prid is not an http(s) push subscription URI")
    default = 443 if parts.scheme == "https" else 80
    port = f":{parts.port}" if parts.port and parts.port != default else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def keys_from_b64(p256dh: str, auth: str) -> ece.SubscriptionKeys:
    """Subscription keys as the browser's ``PushSubscription.toJSON()`` gives them."""
    try:
        return ece.SubscriptionKeys(jws.b64url_decode(p256dh), jws.b64url_decode(auth))
    except (jws.JwsError, ece.EceError) as exc:
        raise PushError(f"bad subscription keys: {exc}") from None


class WebPushProvider:
    """Sends Web Push messages to any push service, authenticated with VAPID."""

    name = "webpush"

    def __init__(
        self,
        vapid: VapidKey,
        *,
        transport: HttpTransport | None = None,
        clock: Clock | None = None,
        subscription_keys: Mapping[str, ece.SubscriptionKeys] | None = None,
        backoff: Backoff | None = None,
        sleep: Sleep | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.vapid = vapid
        self._transport = transport or make_transport("http")
        self._clock: Clock = clock or SystemClock()
        self._keys: OrderedDict[str, ece.SubscriptionKeys] = OrderedDict(subscription_keys or {})
        self._backoff = backoff or Backoff()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._rng = rng or random.random
        self._vapid_cache: dict[str, tuple[str, float]] = {}  # aud -> (jwt, renew at wall)
        self._inflight = InFlight()

    def set_subscription_keys(self, endpoint: str, keys: ece.SubscriptionKeys | None) -> None:
        """Remember (or forget, with None) the keys that let pushes to ``endpoint`` carry data."""
        if keys is None:
            self._keys.pop(endpoint, None)
            return
        self._keys[endpoint] = keys
        self._keys.move_to_end(endpoint)
        while len(self._keys) > MAX_KEYS:
            self._keys.popitem(last=False)

    def accepts(self, destination: Destination) -> bool:
        return destination.provider is Provider.WEBPUSH

    def _authorization(self, audience: str) -> str:
        now = self._clock.wall()
        cached = self._vapid_cache.get(audience)
        if cached is None or now >= cached[1]:
            cached = (self.vapid.token(audience, now), now + VAPID_LIFETIME / 2)
            self._vapid_cache[audience] = cached
        return f"vapid t={cached[0]}, k={self.vapid.public_key_b64}"

    def build(self, request: PushRequest) -> tuple[list[tuple[str, str]], bytes]:
        """Headers and body of one push (encrypted when the subscription's keys are known)."""
        endpoint = request.destination.token
        headers = [
            ("authorization", self._authorization(audience_of(endpoint))),
            ("ttl", str(max(0, int(request.ttl)))),
            ("urgency", "high" if request.kind in URGENT else "normal"),
        ]
        if request.collapse_id and _TOPIC.fullmatch(request.collapse_id):
            headers.append(("topic", request.collapse_id))  # RFC 8030 §5.4: replaces older
        keys = self._keys.get(endpoint)
        if keys is None:
            return headers, b""
        payload = {"type": str(request.kind), **data_fields(request, self._clock.wall())}
        try:
            body = ece.encrypt(json.dumps(payload, separators=(",", ":")).encode(), keys)
        except ece.EceError as exc:
            raise PushError(f"cannot encrypt the payload: {exc}") from None
        headers += [
            ("content-encoding", "aes128gcm"),
            ("content-type", "application/octet-stream"),
        ]
        return headers, body

    async def send(self, request: PushRequest) -> PushResult:
        self._inflight.enter()
        try:
            return await self._send(request)
        finally:
            self._inflight.leave()

    async def _send(self, request: PushRequest) -> PushResult:
        dest = request.destination
        try:
            headers, body = self.build(request)
        except PushError as exc:
            return PushResult(Outcome.FAILED, str(exc))
        retry = 0
        while True:
            resp: HttpResponse | None = None
            try:
                resp = await self._transport.request("POST", dest.token, headers, body)
            except TransportError as exc:
                if exc.maybe_processed:  # the push may have been delivered: never re-send
                    return PushResult(Outcome.FAILED, str(exc))
                failure = str(exc)
            else:
                if resp.status not in RETRYABLE:
                    result = self._result(resp)
                    log.debug("Web Push to %s: %s", dest.token_prefix(), result.outcome)
                    return result
                failure = f"push service answered {resp.status}"
            retry += 1
            asked = retry_after(resp.headers, self._clock.wall()) if resp else None
            delay = self._backoff.delay(retry, self._rng(), asked)
            if delay is None:
                return PushResult(Outcome.FAILED, failure, status=resp.status if resp else None)
            await self._sleep(delay)

    @staticmethod
    def _result(resp: HttpResponse) -> PushResult:
        if 200 <= resp.status < 300:
            return PushResult(
                Outcome.SENT, provider_id=resp.headers.get("location", ""), status=resp.status
            )
        text = resp.body[:200].decode("utf-8", "replace").strip()
        reason = f"push service answered {resp.status} {text}".strip()
        if resp.status in (404, 410):
            return PushResult(Outcome.TOKEN_REJECTED, reason, status=resp.status)
        return PushResult(Outcome.FAILED, reason, status=resp.status)

    async def aclose(self) -> None:
        """Let pushes under way finish, then close the connections."""
        await self._inflight.wait_idle()
        await self._transport.aclose()


def build_webpush_provider(
    config: Config,
    *,
    key_file: str | None = None,
    subject: str | None = None,
    ca_file: str | None = None,
    subscription_keys: Mapping[str, ece.SubscriptionKeys] | None = None,
    clock: Clock | None = None,
) -> WebPushProvider | None:
    """Web Push from ``[push.webpush]`` plus overrides; None without a VAPID key.

    Raises :class:`PushError` naming the key that cannot be used (never its content).
    """
    wp = config.webpush
    path = key_file or (
        str(config.resolve_path(wp.vapid_private_key)) if wp.vapid_private_key else ""
    )
    if not path:
        return None
    try:
        vapid = VapidKey.load(path, subject if subject is not None else wp.vapid_subject)
    except PushError as exc:
        raise PushError(f"[push.webpush] vapid-private-key: {exc}") from None
    ca = ca_file
    if ca is None and config.push.ca_file:
        ca = str(config.resolve_path(config.push.ca_file))
    return WebPushProvider(
        vapid,
        transport=make_transport("http", ssl_context=ssl_context(ca)),
        clock=clock,
        subscription_keys=subscription_keys,
    )
