"""Apple Push Notification service: payloads, headers, credentials and the provider.

Three parts, from pure to I/O:

* :func:`build_message` turns a :class:`PushRequest` into the APNs path, headers and JSON
  body (pure; time comes from a clock). Payloads follow what Flexisip sends, because the
  Linphone apps read those keys.
* :class:`JwtSigner` makes the ES256 provider token of token auth and keeps it for a
  configurable age (Apple refuses tokens older than an hour and throttles renewals more
  frequent than every 20 minutes).
* :class:`ApnsProvider` sends over long-lived HTTP/2 connections (one per base URL and
  credential), maps Apple's answers to outcomes and retries what Apple asks to retry.

Kind → APNs mapping (as Flexisip does it):

======================  ===========  ===============  ========  ==========================
kind                    push-type    topic            priority  aps
======================  ===========  ===============  ========  ==========================
CALL (PushKit)          voip         bundle.voip      10        sound "", loc-key IC_MSG,
                                                                loc-args, call-id, uuid,
                                                                send-time
MESSAGE                 alert        bundle           10        alert (body = text when
                                                                given), sound, badge,
                                                                thread-id when given,
                                                                mutable-content if asked
RINGING                 alert        bundle           10        alert IC_MSG, sound, badge;
                                                                apns-collapse-id = Call-ID
CALL_ENDED              alert        bundle           10        alert IC_MISSED /
                                                                IC_ANSWERED_ELSEWHERE /
                                                                IC_DECLINED_ELSEWHERE (or
                                                                the device's pn-*-str), badge,
                                                                no sound; same collapse id,
                                                                so it replaces the ringing
                                                                alert
BACKGROUND              background   bundle           5         content-available 1 only
======================  ===========  ===============  ========  ==========================

Every payload also carries, at the top level, ``call-id``, ``uuid``, ``send-time`` (UTC,
``YYYY-MM-DD HH:MM:SS``), ``from-uri``, ``display-name``, ``pn_ttl`` and ``customPayload``
(``{}`` when none), plus ``chat-room-addr`` for messages. Linphone's PushKit handler reads
``call-id`` inside ``aps``, where Flexisip puts it for VoIP pushes; it is at the top level
too so that other apps find it in one place. As with Flexisip's ``display-from-uri``,
``from-uri``, ``display-name`` and ``loc-args`` are empty unless the request sets
``display_from_uri`` (the caller's identity is then shown on the lock screen).

Only calls go to PushKit: any other kind addressed to a VoIP token (or a ``.voip`` bundle
id), and a call addressed to a remote-notification token, fail before anything is sent,
since Apple would answer DeviceTokenNotForTopic and the still valid token would be dropped.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import json
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sipwake.clock import Clock, SystemClock
from sipwake.push.http2 import (
    Http2Client,
    Http2ConnectError,
    Http2Error,
    Http2QueueTimeout,
    Http2Timeout,
)
from sipwake.push.request import (
    DEFAULT_END_LOC_KEYS,
    CallEndReason,
    Destination,
    Outcome,
    Provider,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    Service,
)

if TYPE_CHECKING:
    from sipwake.config import Config
    from sipwake.push.http2 import Http2Response

log = logging.getLogger(__name__)

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
MAX_PAYLOAD = 4096  # bytes, every push type but VoIP
MAX_VOIP_PAYLOAD = 5120  # bytes, PushKit
MAX_COLLAPSE_ID = 64  # bytes, Apple's limit on apns-collapse-id

#: Default loc-key of the final alert of a call that rang a remote-only device.
END_LOC_KEYS: Mapping[CallEndReason, str] = DEFAULT_END_LOC_KEYS

#: Apple reasons that mean the token will never work again: callers drop it.
TOKEN_REJECTED_REASONS = frozenset({"Unregistered", "BadDeviceToken", "DeviceTokenNotForTopic"})


def _retryable(status: int) -> bool:
    """Statuses retried with backoff: 429 and every 5xx (Apple uses 500 and 503)."""
    return status == 429 or 500 <= status <= 599


class PayloadTooLarge(PushError):
    """The JSON payload exceeds Apple's limit; sending it would only earn a 413."""


class ApnsConfigError(PushError):
    """APNs credentials or settings that cannot be used.

    ``field`` is the :class:`ApnsSettings` attribute at fault, so the caller can name its
    own spelling of it (a TOML key or a command-line flag).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# --- payload and headers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApnsMessage:
    """One APNs request, ready for the wire (the authorization header comes later)."""

    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


# (second, text) of the last send-time made: every push of a second shares one string.
_last_send_time: tuple[int, str] = (-1, "")


def send_time(wall: float) -> str:
    """Flexisip's ``send-time``: UTC, ``YYYY-MM-DD HH:MM:SS``."""
    global _last_send_time
    second = int(wall)
    cached = _last_send_time
    if cached[0] == second:
        return cached[1]
    text = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    _last_send_time = (second, text)
    return text


def collapse_id_for(call_id: str) -> str:
    """``apns-collapse-id`` from a Call-ID; hashed when longer than Apple's 64 bytes."""
    if len(call_id.encode()) <= MAX_COLLAPSE_ID:
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()  # 64 hex characters


def build_payload(request: PushRequest, clock: Clock) -> dict[str, Any]:
    """The APNs JSON payload of ``request`` (see the module docstring for the layout)."""
    payload = _payload(request, send_time(clock.wall()))
    payload["customPayload"] = dict(request.custom_payload or {})
    return payload


def _payload(request: PushRequest, now: str) -> dict[str, Any]:
    """The payload of ``request`` up to, not including, ``customPayload``."""
    from_uri, display_name = request.shown_caller()
    caller = display_name or from_uri
    strings = request.strings
    kind = request.kind

    aps: dict[str, Any]
    if kind is PushKind.CALL:
        aps = {
            "sound": "",
            "loc-key": strings.call_loc_key,
            "loc-args": [caller],
            "call-id": request.call_id,
            "uuid": request.uuid,
            "send-time": now,
        }
    elif kind is PushKind.BACKGROUND:
        aps = {"content-available": 1}
    elif kind is PushKind.MESSAGE:
        key = strings.groupchat_loc_key if request.group_chat else strings.message_loc_key
        alert: dict[str, Any] = {"loc-key": key, "loc-args": [caller]}
        if request.text:  # read by notification service extensions; Linphone's keys kept
            alert["body"] = request.text
        aps = {
            "alert": alert,
            "sound": strings.message_sound,
            "badge": 0 if request.no_badge else 1,
        }
        if request.thread_id:
            aps["thread-id"] = request.thread_id
        if request.mutable_content:
            aps["mutable-content"] = 1
    elif kind is PushKind.RINGING:
        aps = {
            "alert": {"loc-key": strings.call_loc_key, "loc-args": [caller]},
            "sound": strings.call_sound,
            "badge": 0 if request.no_badge else 1,
        }
    else:  # CALL_ENDED: the device's own text (pn-missing-call-str ...) or the default key
        aps = {
            "alert": {"loc-key": request.final_loc_key(), "loc-args": [caller]},
            "badge": 0 if request.no_badge else 1,
        }

    payload: dict[str, Any] = {
        "aps": aps,
        "from-uri": from_uri,
        "display-name": display_name,
        "call-id": request.call_id,
        "pn_ttl": request.ttl,
        "uuid": request.uuid,
        "send-time": now,
    }
    if kind is PushKind.MESSAGE and (request.chat_room_addr or request.mutable_content):
        payload["chat-room-addr"] = request.chat_room_addr
    return payload


def _json(payload: dict[str, Any]) -> bytes:
    """Compact JSON, non-ASCII kept as UTF-8: the stdlib's exact output."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


_CUSTOM_KEY = b',"customPayload":'


def _body(request: PushRequest, now: str) -> bytes:
    """The JSON body of ``request``: :func:`build_payload` serialized compactly.

    orjson writes the fields sipwake makes (strings and small integers) byte for byte as
    ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)`` does, several times
    faster. A caller's ``customPayload`` may hold what the two spell differently (floats
    such as 1e16, NaN, non-string keys), so it goes through the stdlib and is spliced in;
    anything orjson refuses (lone surrogates, huge integers) takes the stdlib path whole.
    """
    payload = _payload(request, now)
    custom = request.custom_payload
    if type(request.ttl) is int:  # a float TTL could be spelled differently
        if not custom:
            payload["customPayload"] = {}
            try:
                return orjson.dumps(payload)
            except orjson.JSONEncodeError:
                pass
        else:
            try:
                head = orjson.dumps(payload)
                tail = _json(dict(custom))
            except (orjson.JSONEncodeError, UnicodeEncodeError):
                pass  # the stdlib path below raises the error it always raised
            else:
                return b"".join((head[:-1], _CUSTOM_KEY, tail, b"}"))
    payload["customPayload"] = dict(custom or {})
    return _json(payload)


def build_message(request: PushRequest, clock: Clock) -> ApnsMessage:
    """Path, headers and compact JSON body of ``request``.

    Raises :class:`PayloadTooLarge` (a :class:`PushError`) when the body exceeds 4096 bytes
    (5120 for VoIP), so an oversized push never reaches Apple; :meth:`ApnsProvider.send`
    turns it into a FAILED result.
    """
    path, headers, body, _apns_id = _encode(request, clock.wall())
    return ApnsMessage(path, headers, body)


def _encode(
    request: PushRequest, wall: float
) -> tuple[str, tuple[tuple[str, str], ...], bytes, str]:
    """(path, headers, body, apns-id sent or "") of ``request``; see :func:`build_message`."""
    dest = request.destination
    if dest.provider not in _APPLE:
        raise PushError(f"not an APNs destination: {dest.provider}")
    token = dest.token
    if not _token_ok(token):
        raise PushError(f"invalid APNs device token {dest.token_prefix()}")
    kind = request.kind
    voip = kind is PushKind.CALL
    if voip:
        if dest.service is not Service.VOIP:
            raise PushError(
                f"refused: a call push (PushKit) to the remote-notification token "
                f"{dest.token_prefix()} of {dest.app_id}: calls to it are ringing alerts "
                "(nothing sent)"
            )
    elif dest.service is Service.VOIP or dest.app_id.endswith(".voip"):
        raise PushError(
            f"refused: a {kind._value_} push to the VoIP (PushKit) token {dest.token_prefix()} "
            f"of {dest.apns_topic}: only calls go to PushKit (nothing sent)"
        )
    body = _body(request, send_time(wall))
    limit = MAX_VOIP_PAYLOAD if voip else MAX_PAYLOAD
    if len(body) > limit:
        raise PayloadTooLarge(f"payload too large: {len(body)} bytes > {limit}")

    app_id = dest.app_id
    ttl = request.ttl
    expiration = str(int(wall) + ttl if ttl > 0 else 0)
    if voip:
        type_header, topic, priority = _VOIP_TYPE, f"{app_id}.voip", _PRIORITY_10
    elif kind is PushKind.BACKGROUND:
        # Apple refuses priority 10 for background pushes.
        type_header, topic, priority = _BACKGROUND_TYPE, app_id, _PRIORITY_5
    else:
        type_header, topic, priority = _ALERT_TYPE, app_id, _PRIORITY_10
    uuid = request.notification_id or request.uuid
    collapse = request.collapse_id
    if collapse is None and (kind is PushKind.RINGING or kind is PushKind.CALL_ENDED):
        collapse = request.call_id or None
    if _uuid_ok(uuid) is not None:  # otherwise Apple answers BadMessageId; it makes its own
        apns_id = uuid.lower()
        headers: tuple[tuple[str, str], ...] = (
            type_header,
            ("apns-topic", topic),
            ("apns-expiration", expiration),
            priority,
            ("apns-id", apns_id),
        )
    else:
        apns_id = ""
        headers = (type_header, ("apns-topic", topic), ("apns-expiration", expiration), priority)
    if collapse:
        headers += (("apns-collapse-id", collapse_id_for(collapse)),)
    return f"/3/device/{token}", headers, body, apns_id


_APPLE = (Provider.APNS, Provider.APNS_DEV)
_VOIP_TYPE = ("apns-push-type", "voip")
_BACKGROUND_TYPE = ("apns-push-type", "background")
_ALERT_TYPE = ("apns-push-type", "alert")
_PRIORITY_10 = ("apns-priority", "10")
_PRIORITY_5 = ("apns-priority", "5")
# APNs tokens are hexadecimal (either case); the token goes into the :path.
_TOKEN_RE = re.compile(r"[0-9A-Fa-f]+")
_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


_token_ok = _TOKEN_RE.fullmatch
_uuid_ok = _UUID_RE.fullmatch


# --- token auth ---------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_p8_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Read an APNs ``.p8`` key; errors name the file and never show its content."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ApnsConfigError("key_file", f"{p}: cannot read APNs key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ApnsConfigError(
            "key_file", f"{p}: not a PEM private key (an APNs .p8 key is expected)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ApnsConfigError("key_file", f"{p}: not an EC P-256 key (APNs keys are ES256)")
    return key


class JwtSigner:
    """The provider token of APNs token auth: ES256, cached for ``max_age`` seconds."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        clock: Clock,
        max_age: float = 50 * 60,
    ) -> None:
        self._key = key
        self.key_id = key_id
        self.team_id = team_id
        self._clock = clock
        self.max_age = max_age
        self._token: str | None = None
        self._made_at = 0.0
        self.renewals = 0  # how many tokens were made (for stats and tests)

    def token(self) -> str:
        """The current token, renewed once it is ``max_age`` old."""
        if self._token is None or self._clock.monotonic() - self._made_at >= self.max_age:
            self._make()
        assert self._token is not None
        return self._token

    def renew(self, stale: str) -> str:
        """A new token after Apple called ``stale`` expired.

        Many pushes in flight get the same 403 at once; only the first one makes a token,
        the others get that one (Apple throttles renewals).
        """
        if self._token == stale:
            self._make()
        return self.token()

    def _make(self) -> None:
        header = {"alg": "ES256", "kid": self.key_id}
        claims = {"iss": self.team_id, "iat": int(self._clock.wall())}
        signing_input = (
            f"{_b64url(json.dumps(header, separators=(',', ':')).encode())}."
            f"{_b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        ).encode("ascii")
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        self._token = f"{signing_input.decode('ascii')}.{_b64url(signature)}"
        self._made_at = self._clock.monotonic()
        self.renewals += 1


# --- settings -----------------------------------------------------------------------------


@dataclass(slots=True)
class ApnsSettings:
    """What the APNs provider needs, from ``[push.apple]``/``[push]`` or the CLI flags.

    Credentials, in the order they are tried for a destination: a certificate in
    ``certificate_dir`` named after the topic (Flexisip's ``<bundle>.prod.pem``,
    ``<bundle>.dev.pem``, ``<bundle>.voip.prod.pem``, ``<bundle>.voip.dev.pem``), then
    ``cert_file`` (one certificate for every topic), then token auth (``key_file``,
    ``key_id``, ``team_id``).
    """

    enabled: bool = True
    key_file: str = ""
    key_id: str = ""
    team_id: str = ""
    certificate_dir: str = ""
    cert_file: str = ""
    server: str = PRODUCTION_URL
    dev_server: str = SANDBOX_URL
    ca_file: str = ""
    request_timeout: float = 10.0
    connect_timeout: float = 10.0
    ping_interval: float = 60.0
    max_connections: int = 1
    jwt_max_age: float = 50 * 60  # seconds; Apple wants 20..60 minutes
    max_retries: int = 3  # for 429 / 500 / 503 and connection failures
    backoff_base: float = 0.5  # seconds; doubles at each retry, with jitter
    backoff_max: float = 30.0
    retry_after_max: float = 60.0  # a longer Retry-After fails the push instead of waiting

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ApnsSettings:
        """Settings from the TOML configuration (paths relative to the config file)."""
        apple = config.apple

        def path(value: str) -> str:
            return str(config.resolve_path(value)) if value else ""

        settings = cls(
            enabled=apple.enabled,
            key_file=path(apple.key_file),
            key_id=apple.key_id,
            team_id=apple.team_id,
            certificate_dir=path(apple.certificate_dir),
            server=apple.server,
            dev_server=apple.dev_server,
            ca_file=path(config.push.ca_file),
        )
        for name, value in overrides.items():
            setattr(settings, name, value)
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, naming the field."""
        if not 20 * 60 <= self.jwt_max_age <= 60 * 60:
            raise ApnsConfigError(
                "jwt_max_age", f"APNs token age must be 1200..3600 s, got {self.jwt_max_age:g}"
            )
        if self.key_file and not self.key_id:
            raise ApnsConfigError("key_id", f"APNs key id missing (needed with {self.key_file})")
        if self.key_file and not self.team_id:
            raise ApnsConfigError("team_id", f"APNs team id missing (needed with {self.key_file})")
        if (self.key_id or self.team_id) and not self.key_file:
            raise ApnsConfigError("key_file", "APNs key file missing (key id/team id given)")
        for name in ("server", "dev_server"):
            url = getattr(self, name)
            if not re.fullmatch(r"https?://[^/\s]+/?", url):
                raise ApnsConfigError(name, f"APNs URL must be https://host[:port], got {url!r}")
        if self.request_timeout <= 0:
            raise ApnsConfigError("request_timeout", "APNs request timeout must be positive")
        if self.max_retries < 0:
            raise ApnsConfigError("max_retries", "APNs retry count must not be negative")


_CERT_NAME_RE = re.compile(r"(?P<topic>.+)\.(?P<env>prod|dev)\.pem")


def cert_dir_index(directory: str | Path) -> dict[tuple[str, bool], Path]:
    """Map (topic, sandbox) to the certificate file of a Flexisip ``certificate-dir``.

    ``org.example.app.voip.dev.pem`` serves topic ``org.example.app.voip`` in the sandbox.
    Files not following that naming are ignored (with a warning).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ApnsConfigError("certificate_dir", f"{d}: not a directory")
    index: dict[tuple[str, bool], Path] = {}
    for entry in sorted(d.iterdir()):
        if entry.suffix != ".pem" or not entry.is_file():
            continue
        m = _CERT_NAME_RE.fullmatch(entry.name)
        if m is None:
            log.warning("%s: ignored, not named <bundle>[.voip].{prod,dev}.pem", entry)
            continue
        index[(m["topic"], m["env"] == "dev")] = entry
    return index


def client_ssl_context(ca_file: str = "", cert_file: str | Path | None = None) -> ssl.SSLContext:
    """TLS context for APNs: ALPN h2, ``ca_file`` instead of the system store if given,
    and a client certificate (a PEM holding the certificate then its key) if given."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ApnsConfigError("ca_file", f"{ca_file}: cannot load CA file: {exc}") from None
    ctx.set_alpn_protocols(["h2"])
    if cert_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file))
        except FileNotFoundError:
            raise ApnsConfigError("cert_file", f"{cert_file}: no such file") from None
        except (OSError, ssl.SSLError) as exc:
            raise ApnsConfigError(
                "cert_file",
                f"{cert_file}: not a PEM certificate followed by its private key ({exc})",
            ) from None
    return ctx


# --- the provider -------------------------------------------------------------------------


class _Client(Protocol):
    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        *,
        timeout: float | None = None,  # noqa: ASYNC109  # the Http2Client interface
    ) -> Http2Response: ...

    async def aclose(self) -> None: ...


ClientFactory = Callable[[str, ssl.SSLContext, ApnsSettings], _Client]


def _default_client(base_url: str, ctx: ssl.SSLContext, settings: ApnsSettings) -> _Client:
    return Http2Client(
        base_url,
        ssl_context=ctx,
        max_connections=settings.max_connections,
        request_timeout=settings.request_timeout,
        connect_timeout=settings.connect_timeout,
        ping_interval=settings.ping_interval,
    )


@dataclass(frozen=True, slots=True)
class _Route:
    base_url: str
    cert: Path | None  # None: token auth


class _Topic:
    """The route of one (environment, bundle id, service) and, once used, its client."""

    __slots__ = ("client", "route")

    def __init__(self, route: _Route) -> None:
        self.route = route
        self.client: _Client | None = None


# Routes are remembered per (provider, app id, service); app ids come from devices, so the
# memory is bounded.
_MAX_TOPICS = 4096
_NO_ROUTE = object()


class ApnsProvider:
    """Sends pushes to APNs (production and sandbox) with token or certificate auth.

    Key and certificate files are read and checked here, so a bad file stops start-up
    with a message naming it. Connections open on first use and stay open.
    """

    name = "apns"

    def __init__(
        self,
        settings: ApnsSettings,
        *,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random_fraction: Callable[[], float] = random.random,
        client_factory: ClientFactory = _default_client,
    ) -> None:
        settings.check()
        self.settings = settings
        self._clock: Clock = clock or SystemClock()
        self._sleep = sleep
        self._random = random_fraction
        self._client_factory = client_factory
        self._signer: JwtSigner | None = None
        if settings.key_file:
            key = load_p8_key(settings.key_file)
            self._signer = JwtSigner(
                key, settings.key_id, settings.team_id, self._clock, settings.jwt_max_age
            )
        self._cert_file: Path | None = None
        if settings.cert_file:
            self._cert_file = Path(settings.cert_file)
            client_ssl_context(settings.ca_file, self._cert_file)  # fail now, naming the file
        self._cert_index: dict[tuple[str, bool], Path] = {}
        if settings.certificate_dir:
            self._cert_index = cert_dir_index(settings.certificate_dir)
            for cert in self._cert_index.values():
                client_ssl_context(settings.ca_file, cert)
        client_ssl_context(settings.ca_file)  # a bad ca-file is a start-up error too
        self._clients: dict[_Route, _Client] = {}
        self._topics: dict[tuple[Provider, str, Service], _Topic | None] = {}
        self._auth: tuple[str, tuple[str, str]] = ("", ("authorization", ""))
        self._active = 0  # pushes under way
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    @property
    def signer(self) -> JwtSigner | None:
        return self._signer

    def _route(self, dest: Destination) -> _Route | None:
        topic = self._topic(dest)
        return None if topic is None else topic.route

    def _topic(self, dest: Destination) -> _Topic | None:
        """The route state of ``dest``, worked out on first use (settings do not change)."""
        key = (dest.provider, dest.app_id, dest.service)
        topic = self._topics.get(key, _NO_ROUTE)
        if topic is _NO_ROUTE:
            route = self._find_route(dest)
            topic = None if route is None else _Topic(route)
            if len(self._topics) >= _MAX_TOPICS:
                self._topics.clear()
            self._topics[key] = topic
        return topic  # type: ignore[return-value]  # not _NO_ROUTE any more

    def _find_route(self, dest: Destination) -> _Route | None:
        base = self.settings.dev_server if dest.sandbox else self.settings.server
        cert = self._cert_index.get((dest.apns_topic, dest.sandbox))
        if cert is None and dest.service is Service.VOIP:
            # Apple's universal app certificate also serves the app's .voip topic.
            cert = self._cert_index.get((dest.app_id, dest.sandbox))
        if cert is not None:
            return _Route(base, cert)
        if self._cert_file is not None:
            return _Route(base, self._cert_file)
        if self._signer is not None:
            return _Route(base, None)
        return None

    def accepts(self, destination: Destination) -> bool:
        """An Apple destination for which a certificate or a key is configured."""
        return (
            self.settings.enabled
            and destination.provider in _APPLE
            and self._topic(destination) is not None
        )

    def _client(self, route: _Route) -> _Client:
        client = self._clients.get(route)
        if client is None:
            ctx = client_ssl_context(self.settings.ca_file, route.cert)
            client = self._client_factory(route.base_url.rstrip("/"), ctx, self.settings)
            self._clients[route] = client
        return client

    def _authorization(self, jwt: str) -> tuple[str, str]:
        """The authorization header for ``jwt``, made once per token."""
        auth = self._auth
        if auth[0] is not jwt:
            auth = self._auth = (jwt, ("authorization", f"bearer {jwt}"))
        return auth[1]

    async def send(self, request: PushRequest) -> PushResult:
        """Send one push; retries 429/5xx with backoff and a 403 ExpiredProviderToken once."""
        if self._closing:
            return PushResult(Outcome.FAILED, "APNs provider closed")
        dest = request.destination
        if dest.provider not in _APPLE:
            return PushResult(Outcome.FAILED, f"not an APNs destination: {dest.provider}")
        if not self._active:
            self._idle.clear()
        self._active += 1
        try:  # the whole push in this one coroutine: no second one per push
            topic = self._topic(dest) if self.settings.enabled else None
            if topic is None:
                return PushResult(
                    Outcome.FAILED, f"no APNs credentials for topic {dest.apns_topic}"
                )
            try:
                path, headers, body, sent_id = _encode(request, self._clock.wall())
            except PushError as exc:
                return PushResult(Outcome.FAILED, str(exc))
            route = topic.route
            client = topic.client
            if client is None:
                client = topic.client = self._client(route)
            signer = self._signer if route.cert is None else None
            timeout = self.settings.request_timeout
            jwt: str | None = None
            token_retried = False
            retries = 0
            while True:
                if signer is not None:
                    if jwt is None:
                        jwt = signer.token()
                    sent_headers = (*headers, self._authorization(jwt))
                else:
                    sent_headers = headers
                try:
                    response = await client.request(
                        "POST", path, sent_headers, body, timeout=timeout
                    )
                except Http2QueueTimeout as exc:  # never reached Apple
                    return self._done(dest, PushResult(Outcome.FAILED, f"timeout, {exc}"))
                except Http2Timeout:
                    return self._done(dest, PushResult(Outcome.FAILED, "timeout"))
                except Http2ConnectError as exc:
                    delay = self._backoff(retries, None)
                    if retries >= self.settings.max_retries or delay is None:
                        return self._done(
                            dest, PushResult(Outcome.FAILED, f"cannot connect: {exc}")
                        )
                    retries += 1
                    await self._sleep(delay)
                    continue
                except Http2Error as exc:
                    # The server may have processed it: re-sending could double the push.
                    return self._done(dest, PushResult(Outcome.FAILED, f"connection lost: {exc}"))

                status = response.status
                if status == 200:  # the common case, first
                    apns_id = response.headers.get("apns-id")
                    return PushResult(
                        Outcome.SENT, "", sent_id if apns_id is None else apns_id, 200
                    )
                reason = _reason(response.body)
                apns_id = response.headers.get("apns-id", sent_id)
                if status == 410 or reason in TOKEN_REJECTED_REASONS:
                    return self._done(
                        dest,
                        PushResult(
                            Outcome.TOKEN_REJECTED, reason or "Unregistered", apns_id, status
                        ),
                    )
                if (
                    status == 403
                    and reason == "ExpiredProviderToken"
                    and signer is not None
                    and jwt is not None
                    and not token_retried
                ):
                    token_retried = True
                    jwt = signer.renew(jwt)
                    continue
                if _retryable(status) and retries < self.settings.max_retries:
                    delay = self._backoff(
                        retries, _retry_after(response.headers, self._clock.wall())
                    )
                    if delay is not None:
                        retries += 1
                        log.info(
                            "APNs %s %s for %s, retry %d in %.2fs",
                            status, reason, dest.token_prefix(), retries, delay,
                        )  # fmt: skip
                        await self._sleep(delay)
                        continue
                text = reason or f"HTTP {status}"
                return self._done(dest, PushResult(Outcome.FAILED, text, apns_id, status))
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    def _backoff(self, retries: int, asked: float | None) -> float | None:
        """Seconds before retry number ``retries + 1``; None when Apple asks for too long."""
        s = self.settings
        if asked is not None:
            return None if asked > s.retry_after_max else max(0.0, asked)
        base: float = min(s.backoff_max, s.backoff_base * 2.0**retries)
        return base * (0.5 + 0.5 * self._random())  # jitter spreads a burst of retries

    def _done(self, dest: Destination, result: PushResult) -> PushResult:
        if not result.ok:
            log.info(
                "APNs push to %s (%s): %s %s",
                dest.token_prefix(), dest.apns_topic, result.outcome, result.reason,
            )  # fmt: skip
        return result

    async def aclose(self) -> None:
        """Refuse new pushes, let those under way get their answer, then disconnect.

        Pushes under way end by themselves: each attempt has a timeout and the retries
        are bounded.
        """
        self._closing = True
        await self._idle.wait()
        self._topics.clear()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _reason(body: bytes) -> str:
    """Apple's ``{"reason": "...", "timestamp": ...}`` error body; empty if absent."""
    if not body:
        return ""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else ""


def _retry_after(headers: Mapping[str, str], now_wall: float) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date); None when absent or bad."""
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit() alone admits "²"
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now_wall)
