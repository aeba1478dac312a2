"""A strict local look-alike of Apple's APNs HTTP/2 provider API.

Two environments listen on two ports, like ``api.push.apple.com`` (production) and
``api.sandbox.push.apple.com`` (development), so that a client mixing them up is caught.
Requests are checked the way APNs documents it ("Sending notification requests to APNs"
and "Handling notification responses from APNs"): method, path, token format, provider
token (ES256 JWT: kid, iss, iat, signature) or client certificate, topic, push type,
priority, expiration, apns-id, collapse id, payload size and shape. Every accepted push is
recorded in memory.

:class:`ApnsRules` holds the decisions and is sans-IO (a request and the connection's auth
state in, a :class:`Verdict` out, time from a clock object); :class:`ApnsSimulator` is the
asyncio edge (TLS, sockets, response delays). Faults can be injected at runtime: the first N
requests answered 503 (or 429), a graceful GOAWAY after N streams on each connection, a
response delay and an idle timeout.

Where Apple's documentation leaves a choice open, the simulator picks the stricter reading:
a topic outside the credential's apps is 400 TopicDisallowed, and DeviceTokenNotForTopic is
kept for tokens registered to another topic; a push type that does not match the topic's
suffix (``voip`` needs ``<bundle>.voip``) or a background payload with alert, sound or
badge is 400 InvalidPushType; background pushes need ``apns-priority: 5`` (400
BadPriority); a body that is not a JSON object is 400 BadPayload (Apple names no reason);
each client certificate is valid for one environment (403 BadCertificateEnvironment).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import logging
import re
import secrets
import ssl
import string
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID, ObjectIdentifier

from sipwake.clock import Clock, SystemClock
from sipwake.simulator.h2server import Http2ProtocolError, Http2Request, Http2ServerConnection
from sipwake.simulator.tls import (
    Pki,
    PkiError,
    _write_private,
    key_pem,
    load_private_key,
    new_key,
)

log = logging.getLogger(__name__)

DEFAULT_APP = "org.example.app"

# Apple's certificate extensions marking the environments an APNs certificate is for.
OID_APNS_DEVELOPMENT = ObjectIdentifier("1.2.840.113635.100.6.3.1")
OID_APNS_PRODUCTION = ObjectIdentifier("1.2.840.113635.100.6.3.2")

PROVIDER_TOKEN_LIFETIME = 3600.0  # APNs rejects tokens whose iat is older than one hour
APPLE_TOKEN_UPDATE_INTERVAL = 1200.0  # APNs: one new provider token per 20 minutes
MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64

PUSH_TYPES = (
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "location",
    "liveactivity",
    "pushtotalk",
    "controls",
)
# The topic suffix Apple requires for each push type (appended to the bundle id). mdm
# topics come from the MDM certificate and are not checked against a suffix.
TOPIC_SUFFIX = {
    "alert": "",
    "background": "",
    "controls": "",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
}
_SPECIAL_SUFFIXES = sorted((s for s in TOPIC_SUFFIX.values() if s), key=len, reverse=True)

_TOKEN_RE = re.compile(r"^(?:[0-9a-fA-F]{2}){32,100}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_TOPIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{0,254}$")
_ID_ALPHABET = string.ascii_uppercase + string.digits


class Environment(enum.StrEnum):
    """The two APNs environments."""

    PRODUCTION = "production"
    DEVELOPMENT = "development"

    @classmethod
    def parse(cls, value: str | Environment) -> Environment:
        """Accept Flexisip's ``prod``/``dev`` and Apple's ``sandbox`` as well."""
        if isinstance(value, Environment):
            return value
        v = value.strip().lower()
        if v in ("prod", "production"):
            return cls.PRODUCTION
        if v in ("dev", "development", "sandbox"):
            return cls.DEVELOPMENT
        raise ValueError(f"unknown APNs environment {value!r} (use prod or dev)")

    @property
    def short(self) -> str:
        return "prod" if self is Environment.PRODUCTION else "dev"


def _random_id() -> str:
    """A 10-character id shaped like Apple's key and team ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_provider_token(
    key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, issued_at: float
) -> str:
    """An APNs provider token (ES256 JWT) — for tests and users' scripts."""
    header = _b64url(json.dumps({"alg": "ES256", "kid": key_id}).encode())
    claims = _b64url(json.dumps({"iss": team_id, "iat": int(issued_at)}).encode())
    signing_input = f"{header}.{claims}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# -- configuration and state ---------------------------------------------------------------


@dataclass(slots=True)
class ApnsTeam:
    """A developer team: its signing key and the apps (bundle ids) it may push to."""

    team_id: str
    key_id: str
    public_key: ec.EllipticCurvePublicKey
    bundles: tuple[str, ...]
    key_file: Path | None = None

    def allowed_topics(self) -> set[str]:
        """Each bundle with every push-type suffix (``bundle``, ``bundle.voip``, …)."""
        return {b + suffix for b in self.bundles for suffix in set(TOPIC_SUFFIX.values())}


@dataclass(slots=True)
class CertificateInfo:
    """What the simulator reads from a client certificate, as APNs reads Apple's."""

    uid: str | None  # subject UID: the bundle id (``bundle.voip`` for a VoIP certificate)
    environments: frozenset[Environment]
    subject: str

    @classmethod
    def from_der(cls, der: bytes) -> CertificateInfo:
        cert = x509.load_der_x509_certificate(der)
        uids = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
        uid = str(uids[0].value) if uids else None
        envs: set[Environment] = set()
        for ext in cert.extensions:
            if ext.oid == OID_APNS_DEVELOPMENT:
                envs.add(Environment.DEVELOPMENT)
            elif ext.oid == OID_APNS_PRODUCTION:
                envs.add(Environment.PRODUCTION)
        return cls(uid, frozenset(envs), cert.subject.rfc4514_string())

    def topics(self) -> set[str]:
        """A VoIP certificate serves its own topic; an app certificate also ``.voip`` and
        ``.complication`` (Apple's universal push certificate)."""
        if not self.uid:
            return set()
        if self.uid.endswith(".voip"):
            return {self.uid}
        return {self.uid, self.uid + ".voip", self.uid + ".complication"}


@dataclass(slots=True)
class Faults:
    """Injected failures; changed at runtime through the API or the admin endpoint.

    ``fail_first``: the next N requests (both environments) are answered ``fail_status``
    (503 ServiceUnavailable or 429 TooManyRequests) before any validation, with a
    ``retry-after`` header when ``retry_after`` is set. ``goaway_after``: each connection
    sends a graceful GOAWAY once it has processed N streams. ``delay``: seconds to wait
    before each response. ``idle_timeout``: a connection without a request for that many
    seconds gets a GOAWAY with APNs' ``IdleTimeout`` reason and is closed (APNs closes
    idle connections too; clients must reconnect without losing a push). ``token_limit``:
    more than N accepted pushes to one device token within ``token_window`` seconds are
    answered 429 TooManyRequests, as APNs throttles pushes to a single device.
    """

    fail_first: int = 0
    fail_status: int = 503
    retry_after: int | None = None
    goaway_after: int = 0
    delay: float = 0.0
    idle_timeout: float | None = None
    token_limit: int = 0
    token_window: float = 1.0

    def validate(self) -> None:
        if self.fail_first < 0:
            raise ValueError("fail_first must be >= 0")
        if self.fail_status not in (429, 503):
            raise ValueError("fail_status must be 429 or 503")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.goaway_after < 0:
            raise ValueError("goaway_after must be >= 0")
        if not 0 <= self.delay <= 60:
            raise ValueError("delay must be between 0 and 60 seconds")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0 seconds")
        if self.token_limit < 0:
            raise ValueError("token_limit must be >= 0")
        if self.token_window <= 0:
            raise ValueError("token_window must be > 0 seconds")


@dataclass(slots=True)
class TokenRegistry:
    """What the simulator knows about device tokens.

    By default any well-formed token is accepted in either environment; a token registered
    for one environment is refused (400 BadDeviceToken) in the other, as APNs refuses a
    sandbox token on production. ``topics`` binds a token to the one topic it belongs to
    (400 DeviceTokenNotForTopic otherwise).
    """

    unregistered: dict[str, int] = field(default_factory=dict)  # token -> ms timestamp
    expired: dict[str, int] = field(default_factory=dict)  # 410 ExpiredToken
    bad: set[str] = field(default_factory=set)
    environment: dict[str, Environment] = field(default_factory=dict)
    topics: dict[str, str] = field(default_factory=dict)

    def clear(self) -> None:
        self.unregistered.clear()
        self.expired.clear()
        self.bad.clear()
        self.environment.clear()
        self.topics.clear()


@dataclass(frozen=True, slots=True)
class ApnsPush:
    """One accepted push, as recorded by the simulator."""

    environment: str
    token: str
    topic: str
    push_type: str
    priority: int
    apns_id: str
    headers: dict[str, str]  # every request header except authorization
    payload: dict[str, Any]
    auth: str  # "token" or "certificate"
    team_id: str | None
    certificate_uid: str | None
    expiration: int | None
    collapse_id: str | None
    received_at: float  # wall-clock seconds
    connection_id: int
    stream_id: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Verdict:
    """The answer to one request; ``push`` is set when it was accepted."""

    status: int
    apns_id: str
    reason: str | None = None
    timestamp: int | None = None
    retry_after: int | None = None
    push: ApnsPush | None = None
    unique_id: str | None = None

    def response(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body as APNs sends them."""
        headers = [("apns-id", self.apns_id)]
        if self.unique_id:
            headers.append(("apns-unique-id", self.unique_id))
        if self.retry_after is not None:
            headers.append(("retry-after", str(self.retry_after)))
        if self.reason is None:
            return self.status, headers, b""
        body: dict[str, Any] = {"reason": self.reason}
        if self.timestamp is not None:
            body["timestamp"] = self.timestamp
        headers.append(("content-type", "application/json"))
        return self.status, headers, json.dumps(body, separators=(",", ":")).encode()


@dataclass(slots=True)
class ConnectionAuth:
    """Per-connection authentication state: APNs binds a connection to one team."""

    connection_id: int
    certificate: CertificateInfo | None = None
    team_id: str | None = None
    token: str | None = None
    token_since: float | None = None  # monotonic time the current token was first seen
    token_iat: int = 0
    streams: int = 0  # streams processed on this connection
    last_processed_stream: int = 0


class _Reject(Exception):
    def __init__(self, status: int, reason: str, timestamp: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.timestamp = timestamp


# -- the rules -----------------------------------------------------------------------------


class ApnsRules:
    """APNs request validation, sans-IO: request + connection state in, verdict out.

    ``token_update_interval`` is the shortest time, in seconds, between two different
    provider tokens on one connection: a request carrying a new token sooner than that
    after the connection's previous token was first accepted is answered 429
    TooManyProviderTokenUpdates (the first token of a connection is always allowed, so a
    client that opens a new connection per token is not caught). Apple documents that
    tokens must not be regenerated more often than once every 20 minutes (1200 s) without
    stating the scope; the default ``None`` disables the check, so that tests which mint a
    fresh token per push still work. ``clock_skew`` is how far in the future a token's
    ``iat`` may lie (default 0); a token is expired once its ``iat`` is more than one hour
    old, on every request, including on a connection where it was accepted before.
    Without ``apns-push-type`` the type is inferred from the topic, as APNs does for
    iOS; ``require_push_type`` answers 400 InvalidPushType instead (watchOS rules).
    """

    def __init__(
        self,
        teams: Iterable[ApnsTeam],
        clock: Clock,
        *,
        token_update_interval: float | None = None,
        clock_skew: float = 0.0,
        require_push_type: bool = False,
    ) -> None:
        self.teams: dict[str, ApnsTeam] = {}  # by key id
        self.require_push_type = require_push_type
        for team in teams:
            self.add_team(team)
        self.clock = clock
        self.token_update_interval = token_update_interval
        self.clock_skew = clock_skew
        self.tokens = TokenRegistry()
        self.faults = Faults()
        self.failed_so_far = 0
        self.token_hits: dict[str, deque[float]] = {}  # for Faults.token_limit

    def add_team(self, team: ApnsTeam) -> None:
        self.teams[team.key_id] = team

    def evaluate(self, req: Http2Request, env: Environment, conn: ConnectionAuth) -> Verdict:
        """Decide the answer to one complete request."""
        supplied_id = req.header("apns-id")
        apns_id = supplied_id if supplied_id and _UUID_RE.match(supplied_id) else None
        if apns_id is None:
            apns_id = str(uuid.uuid4())
        faults = self.faults
        if self.failed_so_far < faults.fail_first:
            self.failed_so_far += 1
            reason = "ServiceUnavailable" if faults.fail_status == 503 else "TooManyRequests"
            return Verdict(faults.fail_status, apns_id, reason, retry_after=faults.retry_after)
        try:
            push = self._check(req, env, conn, apns_id, supplied_id)
        except _Reject as rej:
            return Verdict(rej.status, apns_id, rej.reason, timestamp=rej.timestamp)
        except Exception:  # a simulator bug must answer, not kill the connection
            log.exception("APNs simulator failed on a request")
            return Verdict(500, apns_id, "InternalServerError")
        unique = str(uuid.uuid4()) if env is Environment.DEVELOPMENT else None
        return Verdict(200, apns_id, push=push, unique_id=unique)

    # The order follows what a client can fix first: transport-level mistakes (method,
    # path), then credentials, then headers, then the token and the payload.
    def _check(
        self,
        req: Http2Request,
        env: Environment,
        conn: ConnectionAuth,
        apns_id: str,
        supplied_id: str | None,
    ) -> ApnsPush:
        names = [k for k, _ in req.headers]
        if len(names) != len(set(names)):
            raise _Reject(400, "DuplicateHeaders")
        if req.header(":method") != "POST":
            raise _Reject(405, "MethodNotAllowed")
        path = req.header(":path") or ""
        prefix = "/3/device/"
        if not path.startswith(prefix):
            raise _Reject(404, "BadPath")
        token = path[len(prefix) :]
        if not token:
            raise _Reject(400, "MissingDeviceToken")
        if "/" in token or "?" in token or "#" in token:
            raise _Reject(404, "BadPath")

        auth_kind, team, cert = self._authenticate(req, env, conn)

        topic = req.header("apns-topic")
        if topic is None:
            cert_topics = cert.topics() if cert else set()
            if cert is not None and len(cert_topics) == 1:
                topic = next(iter(cert_topics))  # APNs defaults to the certificate's topic
            else:
                raise _Reject(400, "MissingTopic")
        if not _TOPIC_RE.match(topic):
            raise _Reject(400, "BadTopic")
        allowed = team.allowed_topics() if team is not None else (cert.topics() if cert else set())
        if topic not in allowed:
            raise _Reject(400, "TopicDisallowed")

        push_type = req.header("apns-push-type")
        if push_type is None:
            if self.require_push_type:
                raise _Reject(400, "InvalidPushType")
            push_type = _infer_push_type(topic)
        if push_type not in PUSH_TYPES:
            raise _Reject(400, "InvalidPushType")
        if push_type != "mdm" and _topic_suffix(topic) != TOPIC_SUFFIX[push_type]:
            raise _Reject(400, "InvalidPushType")

        prio_text = req.header("apns-priority")
        if prio_text is None:
            priority = 10
        elif prio_text in ("1", "5", "10"):
            priority = int(prio_text)
        else:
            raise _Reject(400, "BadPriority")
        if push_type == "background" and priority != 5:
            raise _Reject(400, "BadPriority")

        exp_text = req.header("apns-expiration")
        expiration = None
        if exp_text is not None:
            if not exp_text.isascii() or not exp_text.isdigit():
                raise _Reject(400, "BadExpirationDate")
            expiration = int(exp_text)

        if supplied_id is not None and not _UUID_RE.match(supplied_id):
            raise _Reject(400, "BadMessageId")

        collapse_id = req.header("apns-collapse-id")
        if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID:
            raise _Reject(400, "BadCollapseId")

        if not _TOKEN_RE.match(token):
            raise _Reject(400, "BadDeviceToken")
        key = token.lower()
        registered_env = self.tokens.environment.get(key)
        if registered_env is not None and registered_env is not env:
            raise _Reject(400, "BadDeviceToken")

        if req.body_size == 0:
            raise _Reject(400, "PayloadEmpty")
        limit = MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD
        if req.body_size > limit:
            raise _Reject(413, "PayloadTooLarge")
        payload = _parse_payload(req.body)
        if push_type == "background":
            aps = payload.get("aps")
            if (
                not isinstance(aps, dict)
                or aps.get("content-available") != 1
                or any(k in aps for k in ("alert", "sound", "badge"))
            ):
                raise _Reject(400, "InvalidPushType")

        if key in self.tokens.bad:
            raise _Reject(400, "BadDeviceToken")
        bound_topic = self.tokens.topics.get(key)
        if bound_topic is not None and bound_topic != topic:
            raise _Reject(400, "DeviceTokenNotForTopic")
        if key in self.tokens.unregistered:
            raise _Reject(410, "Unregistered", timestamp=self.tokens.unregistered[key])
        if key in self.tokens.expired:
            raise _Reject(410, "ExpiredToken", timestamp=self.tokens.expired[key])
        if self.faults.token_limit:
            self._throttle(key)

        headers = {k: v for k, v in req.headers if k != "authorization"}
        return ApnsPush(
            environment=env.value,
            token=token,
            topic=topic,
            push_type=push_type,
            priority=priority,
            apns_id=apns_id,
            headers=headers,
            payload=payload,
            auth=auth_kind,
            team_id=team.team_id if team else None,
            certificate_uid=cert.uid if cert else None,
            expiration=expiration,
            collapse_id=collapse_id,
            received_at=self.clock.wall(),
            connection_id=conn.connection_id,
            stream_id=req.stream_id,
        )

    def _throttle(self, key: str) -> None:
        """Count an accepted push to ``key``; 429 once the token's window is full."""
        now = self.clock.monotonic()
        hits = self.token_hits.setdefault(key, deque())
        while hits and now - hits[0] >= self.faults.token_window:
            hits.popleft()
        if len(hits) >= self.faults.token_limit:
            raise _Reject(429, "TooManyRequests")
        hits.append(now)

    def _authenticate(
        self, req: Http2Request, env: Environment, conn: ConnectionAuth
    ) -> tuple[str, ApnsTeam | None, CertificateInfo | None]:
        """Provider token when an authorization header is present, else the certificate."""
        authz = req.header("authorization")
        if authz is not None:
            return "token", self._check_provider_token(authz, conn), None
        cert = conn.certificate
        if cert is None:
            raise _Reject(403, "MissingProviderToken")
        if not cert.uid or not cert.environments:
            raise _Reject(403, "BadCertificate")
        if env not in cert.environments:
            raise _Reject(403, "BadCertificateEnvironment")
        return "certificate", None, cert

    def _check_provider_token(self, authz: str, conn: ConnectionAuth) -> ApnsTeam:
        scheme, _, token = authz.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Reject(403, "MissingProviderToken" if not token else "InvalidProviderToken")
        now = self.clock.wall()
        if token == conn.token and conn.team_id is not None:
            team = next(t for t in self.teams.values() if t.team_id == conn.team_id)
            iat = conn.token_iat
        else:
            team, iat = self._verify_jwt(token)
            if now + self.clock_skew < iat:
                raise _Reject(403, "InvalidProviderToken")
            if conn.team_id is not None and conn.team_id != team.team_id:
                raise _Reject(403, "InvalidProviderToken")
        if now - iat > PROVIDER_TOKEN_LIFETIME:
            raise _Reject(403, "ExpiredProviderToken")
        if token != conn.token:
            mono = self.clock.monotonic()
            interval = self.token_update_interval
            if (
                interval is not None
                and conn.token_since is not None
                and mono - conn.token_since < interval
            ):
                raise _Reject(429, "TooManyProviderTokenUpdates")
            conn.token = token
            conn.token_since = mono
            conn.token_iat = iat
            conn.team_id = team.team_id
        return team

    def _verify_jwt(self, token: str) -> tuple[ApnsTeam, int]:
        parts = token.split(".")
        if len(parts) != 3:
            raise _Reject(403, "InvalidProviderToken")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error, RecursionError) as exc:
            raise _Reject(403, "InvalidProviderToken") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise _Reject(403, "InvalidProviderToken")
        if header.get("alg") != "ES256":
            raise _Reject(403, "InvalidProviderToken")
        team = self.teams.get(str(header.get("kid")))
        if team is None:
            raise _Reject(403, "InvalidProviderToken")
        if claims.get("iss") != team.team_id:
            raise _Reject(403, "InvalidProviderToken")
        iat = claims.get("iat")
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise _Reject(403, "InvalidProviderToken")
        if len(signature) != 64:
            raise _Reject(403, "InvalidProviderToken")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            team.public_key.verify(
                der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature as exc:
            raise _Reject(403, "InvalidProviderToken") from exc
        return team, iat


def _topic_suffix(topic: str) -> str:
    for suffix in _SPECIAL_SUFFIXES:
        if topic.endswith(suffix):
            return suffix
    return ""


def _infer_push_type(topic: str) -> str:
    """What APNs assumes without ``apns-push-type``: the type the topic's suffix implies."""
    suffix = _topic_suffix(topic)
    for push_type, s in TOPIC_SUFFIX.items():
        if s == suffix:
            return push_type
    return "alert"


def _parse_payload(body: bytes) -> dict[str, Any]:
    """The payload must be a JSON object whose ``aps``, if present, is an object.

    Apple documents no reason string for malformed JSON; the simulator answers 400
    ``BadPayload`` so that the mistake is named.
    """
    try:
        payload = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise _Reject(400, "BadPayload") from exc
    if not isinstance(payload, dict):
        raise _Reject(400, "BadPayload")
    if "aps" in payload and not isinstance(payload["aps"], dict):
        raise _Reject(400, "BadPayload")
    return payload


# -- the asyncio edge ------------------------------------------------------------------------


class _ApnsProtocol(asyncio.Protocol):
    """One TLS connection to one environment."""

    def __init__(self, sim: ApnsSimulator, env: Environment) -> None:
        self.sim = sim
        self.env = env
        self.transport: asyncio.Transport | None = None
        self.h2: Http2ServerConnection | None = None
        self.auth: ConnectionAuth | None = None
        # responses waiting for the injected delay: task -> (stream id, verdict)
        self.delayed: dict[asyncio.Task[None], tuple[int, Verdict]] = {}
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        ssl_obj = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_obj, ssl.SSLObject) or ssl_obj.selected_alpn_protocol() != "h2":
            transport.abort()  # APNs speaks HTTP/2 only
            return
        cert_info = None
        der = ssl_obj.getpeercert(binary_form=True)
        if der:
            try:
                cert_info = CertificateInfo.from_der(der)
            except ValueError:
                cert_info = CertificateInfo(None, frozenset(), "")
        self.sim._next_conn_id += 1
        self.auth = ConnectionAuth(self.sim._next_conn_id, certificate=cert_info)
        self.h2 = Http2ServerConnection(self.sim.max_concurrent_streams)
        self.sim._connections.add(self)
        self._last_activity = asyncio.get_running_loop().time()
        self.arm_idle_timer()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.sim._connections.discard(self)
        for task in list(self.delayed):
            task.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.h2 is None or self.auth is None:
            return
        try:
            requests = self.h2.receive_data(data)
        except Http2ProtocolError:
            self._flush()
            self._close()
            return
        for req in requests:
            self._process(req)
        self._flush()

    def _process(self, req: Http2Request) -> None:
        assert self.h2 is not None and self.auth is not None
        last = self.h2.goaway_last_stream_id
        if last is not None and req.stream_id > last:
            return  # after GOAWAY: neither processed nor recorded
        auth = self.auth
        self._last_activity = asyncio.get_running_loop().time()
        auth.streams += 1
        auth.last_processed_stream = max(auth.last_processed_stream, req.stream_id)
        verdict = self.sim.rules.evaluate(req, self.env, auth)
        if verdict.push is not None:
            self.sim._record(verdict.push)
        if self.sim.on_verdict is not None:
            try:
                self.sim.on_verdict(self.env, req.header(":path") or "", verdict)
            except Exception:
                log.exception("on_verdict callback failed")
        goaway_after = self.sim.rules.faults.goaway_after
        if goaway_after and auth.streams >= goaway_after:
            self.h2.goaway(auth.last_processed_stream)  # sent once these are answered
        delay = self.sim.rules.faults.delay
        if delay > 0:
            task = asyncio.get_running_loop().create_task(
                self._respond_later(req.stream_id, verdict, delay)
            )
            self.delayed[task] = (req.stream_id, verdict)
            task.add_done_callback(lambda t: self.delayed.pop(t, None))
        else:
            self._respond(req.stream_id, verdict)

    def arm_idle_timer(self) -> None:
        """(Re)schedule the idle check for the current ``idle_timeout`` fault."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        idle = self.sim.rules.faults.idle_timeout
        if idle is not None and self.h2 is not None and not self.h2.draining:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_at(self._last_activity + idle, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self.sim.rules.faults.idle_timeout
        if idle is None or self.h2 is None or self.auth is None or self.h2.draining:
            return
        if asyncio.get_running_loop().time() - self._last_activity < idle:
            self.arm_idle_timer()  # a request came meanwhile
            return
        self.h2.goaway(self.auth.last_processed_stream, debug=b'{"reason":"IdleTimeout"}')
        self._flush()

    async def _respond_later(self, stream_id: int, verdict: Verdict, delay: float) -> None:
        await asyncio.sleep(delay)
        self._respond(stream_id, verdict)
        self._flush()

    def _respond(self, stream_id: int, verdict: Verdict) -> None:
        assert self.h2 is not None
        status, headers, body = verdict.response()
        self.h2.respond(stream_id, status, headers, body)

    def _flush(self) -> None:
        if self.h2 is None or self.transport is None or self.transport.is_closing():
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        if self.h2.finished:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """Server stop: answer delayed responses now, then GOAWAY with APNs' ``Shutdown``
        reason in its debug data, then close."""
        for task, (stream_id, verdict) in list(self.delayed.items()):
            task.cancel()
            self._respond(stream_id, verdict)
        self.delayed.clear()
        if self.h2 is not None and self.auth is not None:
            self.h2.goaway(self.auth.last_processed_stream, debug=b'{"reason":"Shutdown"}')
            self.h2.goaway_now()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(self.h2.data_to_send())
        self._close()


class ListenError(OSError):
    """An environment's port could not be bound (``environment`` says which)."""

    def __init__(self, environment: Environment, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot listen on port {port}: {cause.strerror or cause}")
        self.environment = environment
        self.port = port


class ApnsSimulator:
    """APNs production and development on two local TLS ports, with a control API.

    The CA, server certificate, provider key (``AuthKey_<KEYID>.p8``), team and key ids and
    client certificates live under ``state_dir`` and are reused by later runs. In tests::

        async with ApnsSimulator(tmp_path, apps=["org.example.app"]) as sim:
            # point the client at sim.production_url / sim.sandbox_url, trust sim.ca_file,
            # sign with sim.key_file / sim.key_id / sim.team_id, or use
            # sim.client_cert_file("org.example.app", "dev", voip=True) / sim.cert_dir
            sim.set_tokens(unregistered=[...]); sim.set_faults(goaway_after=3)
            await sim.wait_for_pushes(1)
            sim.received  # ApnsPush records, in arrival order

    ``clock`` drives provider-token time checks and throttling windows (a FakeClock in
    tests); certificates always follow the real clock, since TLS peers check them.
    ``max_records`` bounds :attr:`received` for long runs (the oldest tenth is dropped).
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        apps: Iterable[str] = (DEFAULT_APP,),
        team_id: str | None = None,
        key_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        dev_port: int = 0,
        clock: Clock | None = None,
        max_concurrent_streams: int = 1000,
        token_update_interval: float | None = None,
        clock_skew: float = 0.0,
        require_push_type: bool = False,
        max_records: int = 100_000,
        on_push: Callable[[ApnsPush], None] | None = None,
        on_verdict: Callable[[Environment, str, Verdict], None] | None = None,
        pki: Pki | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.apps = tuple(dict.fromkeys(apps)) or (DEFAULT_APP,)
        for app in self.apps:
            if not _TOPIC_RE.match(app) or _topic_suffix(app):
                raise ValueError(f"invalid app bundle id {app!r}")
        self.host = host
        self.clock: Clock = clock or SystemClock()
        self.pki = pki or Pki(self.state_dir)  # certificates follow the real clock
        self.apns_dir = self.state_dir / "apns"
        self.cert_dir = self.apns_dir / "certs"
        self.max_concurrent_streams = max_concurrent_streams
        self.on_push = on_push
        self.on_verdict = on_verdict  # every answer: environment, :path, verdict
        self.received: list[ApnsPush] = []
        self._ports = {Environment.PRODUCTION: port, Environment.DEVELOPMENT: dev_port}
        self._servers: dict[Environment, asyncio.Server] = {}
        self._connections: set[_ApnsProtocol] = set()
        self._next_conn_id = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._requested_ids = (team_id, key_id)
        self.team_id = ""
        self.key_id = ""
        self.key_file = Path()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self.max_records = max_records
        self.rules = ApnsRules(
            (),
            self.clock,
            token_update_interval=token_update_interval,
            clock_skew=clock_skew,
            require_push_type=require_push_type,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create or reuse the CA, server certificate, provider key and client certificates."""
        self.pki.ensure()
        self._ensure_identity()
        for app in self.apps:
            for env in Environment:
                self.client_cert_file(app, env)
                self.client_cert_file(app, env, voip=True)

    async def start(self) -> None:
        """Listen on both environments (ports 0 pick free ports)."""
        self.prepare()
        ctx = self.pki.server_context(("h2",))
        loop = asyncio.get_running_loop()
        try:
            for env in Environment:
                try:
                    server = await loop.create_server(
                        lambda env=env: _ApnsProtocol(self, env),  # type: ignore[misc]
                        self.host,
                        self._ports[env],
                        ssl=ctx,
                    )
                except OSError as exc:
                    raise ListenError(env, self._ports[env], exc) from exc
                self._servers[env] = server
                self._ports[env] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening and close every connection (with a GOAWAY)."""
        for server in self._servers.values():
            server.close()
        for conn in list(self._connections):
            conn.shutdown()
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> ApnsSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- identity and credentials ----------------------------------------------------------

    def _ensure_identity(self) -> None:
        ident_file = self.apns_dir / "identity.json"
        stored: dict[str, Any] = {}
        if ident_file.exists():
            with contextlib.suppress(ValueError, OSError):
                loaded = json.loads(ident_file.read_text())
                if isinstance(loaded, dict):
                    stored = loaded
        want_team, want_key = self._requested_ids
        team_id = want_team or str(stored.get("team_id") or "") or _random_id()
        key_id = want_key or str(stored.get("key_id") or "") or _random_id()
        key_file = self.apns_dir / f"AuthKey_{key_id}.p8"
        key: ec.EllipticCurvePrivateKey | None = None
        if key_file.exists():
            try:
                key = load_private_key(key_file)
            except (PkiError, OSError):
                key = None
        if key is None:
            key = new_key()
            _write_private(key_file, key_pem(key))
        self.apns_dir.mkdir(parents=True, exist_ok=True)
        ident_file.write_text(json.dumps({"team_id": team_id, "key_id": key_id}) + "\n")
        self.team_id, self.key_id, self.key_file, self._key = team_id, key_id, key_file, key
        self.rules.add_team(ApnsTeam(team_id, key_id, key.public_key(), self.apps, key_file))

    def add_team(
        self, team_id: str | None = None, key_id: str | None = None, apps: Iterable[str] = ()
    ) -> tuple[ApnsTeam, ec.EllipticCurvePrivateKey]:
        """Another developer team with its own key (to test one team per connection)."""
        key = new_key()
        team = ApnsTeam(
            team_id or _random_id(), key_id or _random_id(), key.public_key(), tuple(apps)
        )
        self.rules.add_team(team)
        return team, key

    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The team's provider-token key (the private half of :attr:`key_file`)."""
        if self._key is None:
            raise RuntimeError("call start() or prepare() first")
        return self._key

    def provider_token(self, issued_at: float | None = None) -> str:
        """A valid provider token of the default team, issued now unless told otherwise."""
        iat = self.clock.wall() if issued_at is None else issued_at
        return sign_provider_token(self.signing_key, self.key_id, self.team_id, iat)

    def client_cert_file(
        self, bundle: str, env: Environment | str = Environment.PRODUCTION, voip: bool = False
    ) -> Path:
        """Certificate + key PEM for ``bundle``, named as Flexisip expects in a cert dir:
        ``<bundle>.prod.pem``, ``<bundle>.dev.pem``, ``<bundle>.voip.prod.pem``, …

        Each certificate is valid for one environment only (Apple's development
        certificates are; its universal ones are not), so a mix-up shows as 403
        BadCertificateEnvironment.
        """
        environment = Environment.parse(env)
        uid = bundle + ".voip" if voip else bundle
        path = self.cert_dir / f"{uid}.{environment.short}.pem"
        kind = "VoIP Services" if voip else "Apple Push Services"
        if environment is Environment.DEVELOPMENT and not voip:
            kind = "Apple Development IOS Push Services"
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, uid),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{kind}: {uid}"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.team_id or "SIMULATOR"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sipwake simulator"),
            ]
        )
        oid = OID_APNS_PRODUCTION if environment is Environment.PRODUCTION else OID_APNS_DEVELOPMENT
        ext = x509.UnrecognizedExtension(oid, b"\x05\x00")
        return self.pki.ensure_client_pem(path, subject, [ext])

    # -- addresses -------------------------------------------------------------------------

    def url(self, env: Environment | str) -> str:
        environment = Environment.parse(env)
        port = self._ports[environment]
        if not port:
            raise RuntimeError("the simulator is not started")
        return f"https://{self.host}:{port}"

    @property
    def production_url(self) -> str:
        return self.url(Environment.PRODUCTION)

    @property
    def sandbox_url(self) -> str:
        return self.url(Environment.DEVELOPMENT)

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    def port(self, env: Environment | str) -> int:
        return self._ports[Environment.parse(env)]

    # -- records ---------------------------------------------------------------------------

    def _record(self, push: ApnsPush) -> None:
        self.received.append(push)
        if len(self.received) > self.max_records:  # a long-running staging simulator
            del self.received[: max(1, self.max_records // 10)]
        if self.on_push is not None:
            try:
                self.on_push(push)
            except Exception:
                log.exception("on_push callback failed")
        n = len(self.received)
        for count, fut in list(self._waiters):
            if n >= count and not fut.done():
                fut.set_result(None)
        self._waiters = [(c, f) for c, f in self._waiters if not f.done()]

    def clear_received(self) -> None:
        self.received.clear()

    async def wait_for_pushes(self, count: int) -> list[ApnsPush]:
        """Wait until at least ``count`` pushes are recorded (tests: no sleeping; wrap
        in ``asyncio.timeout`` to bound the wait)."""
        if len(self.received) < count:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((count, fut))
            await fut
        return list(self.received)

    @property
    def connection_count(self) -> int:
        """Connections open now."""
        return len(self._connections)

    @property
    def connections_accepted(self) -> int:
        """Connections accepted since start (HTTP/2 connection reuse shows here)."""
        return self._next_conn_id

    # -- runtime control -------------------------------------------------------------------

    def set_tokens(
        self,
        *,
        unregistered: Iterable[str] = (),
        bad: Iterable[str] = (),
        expired: Iterable[str] = (),
        development: Iterable[str] = (),
        production: Iterable[str] = (),
        topics: Mapping[str, str] | None = None,
        replace: bool = False,
    ) -> None:
        """Register tokens: ``unregistered`` → 410 Unregistered, ``expired`` → 410
        ExpiredToken (both with the ``timestamp`` of this call), ``bad`` → 400
        BadDeviceToken, and the environment (or topic) a token belongs to. Adds to the lists
        unless ``replace``."""
        reg = self.rules.tokens
        if replace:
            reg.clear()
        now_ms = int(self.clock.wall() * 1000)
        for t in unregistered:
            reg.unregistered[t.lower()] = now_ms
        for t in expired:
            reg.expired[t.lower()] = now_ms
        reg.bad.update(t.lower() for t in bad)
        for t in development:
            reg.environment[t.lower()] = Environment.DEVELOPMENT
        for t in production:
            reg.environment[t.lower()] = Environment.PRODUCTION
        for t, topic in (topics or {}).items():
            reg.topics[t.lower()] = topic

    @property
    def faults(self) -> Faults:
        return self.rules.faults

    def set_faults(
        self,
        *,
        fail_first: int | None = None,
        fail_status: int | None = None,
        retry_after: int | None = None,
        goaway_after: int | None = None,
        delay: float | None = None,
        idle_timeout: float | None = None,
        token_limit: int | None = None,
        token_window: float | None = None,
    ) -> Faults:
        """Change injected faults (None keeps a value); ``fail_first`` restarts the count of
        failed requests; ``idle_timeout=0`` turns the idle timeout off."""
        f = self.rules.faults
        new = Faults(
            fail_first=f.fail_first if fail_first is None else fail_first,
            fail_status=f.fail_status if fail_status is None else fail_status,
            retry_after=f.retry_after if retry_after is None else retry_after,
            goaway_after=f.goaway_after if goaway_after is None else goaway_after,
            delay=f.delay if delay is None else delay,
            idle_timeout=f.idle_timeout if idle_timeout is None else (idle_timeout or None),
            token_limit=f.token_limit if token_limit is None else token_limit,
            token_window=f.token_window if token_window is None else token_window,
        )
        new.validate()
        self.rules.faults = new
        self.rules.token_hits.clear()
        if fail_first is not None:
            self.rules.failed_so_far = 0
        for conn in self._connections:
            conn.arm_idle_timer()
        return new

    def clear_faults(self) -> None:
        self.rules.faults = Faults()
        self.rules.failed_so_far = 0
        self.rules.token_hits.clear()
        for conn in self._connections:
            conn.arm_idle_timer()

    def state(self) -> dict[str, Any]:
        """This simulator's part of ``state.json``."""
        return {
            "production_url": self.production_url,
            "sandbox_url": self.sandbox_url,
            "key_file": str(self.key_file.absolute()),
            "key_id": self.key_id,
            "team_id": self.team_id,
            "cert_dir": str(self.cert_dir.absolute()),
            "apps": list(self.apps),
        }


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
