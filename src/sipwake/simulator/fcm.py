"""An FCM look-alike: OAuth2 token endpoint, HTTP v1 ``messages:send`` and legacy ``/fcm/send``.

It checks what Google checks (the RS256 assertion against the service account's public
key, ``aud`` and ``scope``; the bearer token; the message shape) and answers in Google's
error format. Tests and users inject ``UNREGISTERED`` tokens, 429/500/503 answers and token
endpoint failures. It generates service-account files whose ``token_uri`` points at itself.

It always serves HTTP/1.1 (``url``, where ``token_uri`` lives, as Google's token endpoint
is usually reached) and, with ``http2=True``, the same API over HTTP/2 on a second port
(``h2_url``), as FCM is reachable both ways.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sipwake.clock import Clock, SystemClock
from sipwake.push import jws
from sipwake.simulator.httpsim import HttpSimServer, SimRequest, SimResponse, json_response
from sipwake.simulator.tls import Pki

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
MAX_TTL = 28 * 24 * 3600
DATA_KEYS = ("uuid", "from-uri", "display-name", "call-id", "sip-from", "loc-key", "loc-args",
             "send-time", "custom-payload")  # fmt: skip
_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_STATUS_NAMES = {429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE", 401: "UNAUTHENTICATED"}


def _google_error(status: int, code: str, message: str) -> SimResponse:
    details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
    return json_response(
        status, {"error": {"code": status, "message": message, "status": code, "details": details}}
    )


@dataclass(slots=True)
class _Account:
    project_id: str
    client_email: str
    public_key: rsa.RSAPublicKey


@dataclass(slots=True)
class _Injection:
    status: int
    retry_after: str | None


@dataclass(slots=True)
class FcmSimulator:
    """State and request handling of the simulated FCM service."""

    clock: Clock = field(default_factory=SystemClock)
    token_lifetime: int = 3600
    accounts: dict[str, _Account] = field(default_factory=dict)  # client_email -> account
    access_tokens: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # token -> (project, exp)
    legacy_keys: dict[str, str] = field(default_factory=dict)  # server key -> project
    unregistered: set[str] = field(default_factory=set)
    invalid_registration: set[str] = field(default_factory=set)  # 400 in v1, error in legacy
    injected: list[_Injection] = field(default_factory=list)
    token_failures: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    legacy_messages: list[dict[str, Any]] = field(default_factory=list)
    token_requests: int = 0
    send_requests: int = 0
    http_versions: set[str] = field(default_factory=set)
    server: HttpSimServer | None = None
    h2_server: HttpSimServer | None = None

    # -- set-up -------------------------------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        pki: Pki | None = None,
        http2: bool = False,
        h2_port: int = 0,
    ) -> FcmSimulator:
        """Listen; with ``pki`` over TLS with the simulator CA's server certificate."""
        self.server = await HttpSimServer(
            self.handle, ssl_context=pki.server_context(("http/1.1",)) if pki else None
        ).start(host, port)
        if http2:
            self.h2_server = await HttpSimServer(
                self.handle, http2=True, ssl_context=pki.server_context(("h2",)) if pki else None
            ).start(host, h2_port)
        return self

    async def aclose(self) -> None:
        for server in (self.server, self.h2_server):
            if server is not None:
                await server.aclose()

    @property
    def h2_url(self) -> str:
        assert self.h2_server is not None, "start(http2=True) first"
        return self.h2_server.url

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.url

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def create_service_account(
        self, project_id: str, path: str | Path | None = None, token_uri: str | None = None
    ) -> dict[str, str]:
        """A new service account of ``project_id`` trusted by this simulator (file mode 0600)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"firebase-adminsdk-{secrets.token_hex(3)}@{project_id}.iam.gserviceaccount.com"
        self.accounts[email] = _Account(project_id, email, key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        data = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri or self.token_uri,
        }
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(mode=0o600)
            target.write_text(json.dumps(data, indent=2))
        return data

    def trust_service_account(self, path: str | Path, project_id: str) -> bool:
        """Trust an existing service-account file of ``project_id``; point it at this simulator.

        False when the file is missing or not a usable RSA service account of that project.
        """
        target = Path(path)
        try:
            data = json.loads(target.read_text())
            key = serialization.load_pem_private_key(data["private_key"].encode(), None)
            email = data["client_email"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(key, rsa.RSAPrivateKey) or data.get("project_id") != project_id:
            return False
        self.accounts[str(email)] = _Account(project_id, str(email), key.public_key())
        if data.get("token_uri") != self.token_uri:
            data["token_uri"] = self.token_uri
            target.write_text(json.dumps(data, indent=2))
        return True

    def add_legacy_key(self, project: str, key: str | None = None) -> str:
        key = key or "AAAA" + secrets.token_urlsafe(30)
        self.legacy_keys[key] = project
        return key

    def inject(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``count`` pushes (v1 or legacy) with ``status``."""
        self.injected.extend(_Injection(status, retry_after) for _ in range(count))

    def revoke_access_tokens(self) -> None:
        """Forget every issued access token: the next push gets 401."""
        self.access_tokens.clear()

    # -- handling -----------------------------------------------------------------------------

    async def handle(self, req: SimRequest) -> SimResponse:
        self.http_versions.add(req.http_version)
        path = req.path.split("?", 1)[0]
        if req.method != "POST":
            return json_response(405, {"error": "method not allowed"})
        if path == "/token":
            return self._token(req)
        if path == "/fcm/send":
            return self._legacy(req)
        match = _SEND_PATH.match(path)
        if match:
            return self._send(req, match.group(1))
        return _google_error(404, "NOT_FOUND", f"no such resource {path}")

    def _token(self, req: SimRequest) -> SimResponse:
        self.token_requests += 1
        if self.token_failures > 0:
            self.token_failures -= 1
            return json_response(
                500, {"error": "internal_failure", "error_description": "injected"}
            )
        form = parse_qs(req.body.decode("utf-8", "replace"))
        if form.get("grant_type") != [GRANT_TYPE]:
            return json_response(400, {"error": "unsupported_grant_type"})
        assertion = (form.get("assertion") or [""])[0]
        try:
            _, unverified = jws.decode_unverified(assertion)
            account = self.accounts.get(str(unverified.get("iss")))
            if account is None:
                raise jws.JwsError("unknown issuer")
            _, claims = jws.verify(assertion, account.public_key)
        except jws.JwsError as exc:
            return json_response(400, {"error": "invalid_grant", "error_description": str(exc)})
        now = self.clock.wall()
        problem = ""
        if claims.get("aud") != self.token_uri:
            problem = "Invalid JWT audience"
        elif SCOPE not in str(claims.get("scope", "")).split():
            problem = "Invalid OAuth scope"
        elif not isinstance(claims.get("exp"), int) or not isinstance(claims.get("iat"), int):
            problem = "Missing iat or exp"
        elif claims["exp"] <= now or claims["iat"] > now + 300:
            problem = "Invalid JWT: token must be a short-lived token and in a reasonable timeframe"
        elif claims["exp"] - claims["iat"] > 3600:
            problem = "Invalid JWT: lifetime longer than one hour"
        if problem:
            return json_response(400, {"error": "invalid_grant", "error_description": problem})
        token = "ya29.sim-" + secrets.token_urlsafe(24)
        self.access_tokens[token] = (account.project_id, now + self.token_lifetime)
        return json_response(
            200, {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _injection(self) -> SimResponse | None:
        if not self.injected:
            return None
        inj = self.injected.pop(0)
        name = _STATUS_NAMES.get(inj.status, "INTERNAL")
        resp = _google_error(inj.status, name, f"injected {inj.status}")
        if inj.retry_after is not None:
            resp.headers.append(("retry-after", inj.retry_after))
        return resp

    def _send(self, req: SimRequest, project: str) -> SimResponse:
        self.send_requests += 1
        auth = req.headers.get("authorization", "")
        granted = (
            self.access_tokens.get(auth.removeprefix("Bearer "))
            if auth.startswith("Bearer ")
            else None
        )
        if granted is None or granted[1] <= self.clock.wall():
            return _google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        if granted[0] != project:
            return _google_error(403, "PERMISSION_DENIED", f"token not valid for project {project}")
        injected = self._injection()
        if injected is not None:
            return injected
        try:
            body = json.loads(req.body)
        except ValueError:
            return _google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem = _check_v1(body)
        if problem:
            return _google_error(400, "INVALID_ARGUMENT", problem)
        message = body["message"]
        if message["token"] in self.invalid_registration:
            return _google_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
            )
        if message["token"] in self.unregistered:
            return _google_error(404, "UNREGISTERED", "Requested entity was not found.")
        self.messages.append({"project": project, **message})
        name = f"projects/{project}/messages/0:{secrets.token_hex(8)}"
        return json_response(200, {"name": name})

    def _legacy(self, req: SimRequest) -> SimResponse:
        self.send_requests += 1
        auth = req.headers.get("authorization", "")
        if not auth.startswith("key=") or auth[4:] not in self.legacy_keys:
            return SimResponse(401, [("content-type", "text/html")], b"<HTML>Unauthorized</HTML>")
        injected = self._injection()
        if injected is not None:
            return SimResponse(
                injected.status, [h for h in injected.headers if h[0] == "retry-after"]
            )
        try:
            body = json.loads(req.body)
        except ValueError:
            return SimResponse(400, [("content-type", "text/plain")], b"JSON_PARSING_ERROR")
        problem = _check_legacy(body)
        if problem:
            return SimResponse(400, [("content-type", "text/plain")], problem.encode())
        to = body["to"]
        multicast = secrets.randbelow(10**18)
        if to in self.unregistered or to in self.invalid_registration:
            error = "NotRegistered" if to in self.unregistered else "InvalidRegistration"
            return json_response(
                200,
                {
                    "multicast_id": multicast,
                    "success": 0,
                    "failure": 1,
                    "results": [{"error": error}],
                },
            )
        self.legacy_messages.append({"project": self.legacy_keys[auth[4:]], **body})
        result = {"message_id": f"0:{secrets.token_hex(8)}"}
        return json_response(
            200, {"multicast_id": multicast, "success": 1, "failure": 0, "results": [result]}
        )


def _check_data(data: Any) -> str:
    if not isinstance(data, dict):
        return "data must be an object"
    for key, value in data.items():
        if not isinstance(value, str):
            return f"Invalid value at 'message.data[{key}].value' (TYPE_STRING)"
    return ""


def _check_v1(body: Any) -> str:
    """Google's checks on a messages:send body, in its words where it has them."""
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, dict):
        return "Invalid JSON payload: message is required"
    if not isinstance(message.get("token"), str) or not message["token"]:
        return "Recipient of the message is not set."
    android = message.get("android", {})
    if not isinstance(android, dict):
        return "android must be an object"
    if android.get("priority", "normal") not in ("normal", "high"):
        return "Invalid value at 'message.android.priority'"
    ttl = android.get("ttl")
    if ttl is not None:
        if not isinstance(ttl, str) or not re.fullmatch(r"\d+(\.\d+)?s", ttl):
            return "Invalid value at 'message.android.ttl' (Duration)"
        if float(ttl[:-1]) > MAX_TTL:
            return "TTL must not exceed 4 weeks"
    for where in (message, android):
        if "data" in where:
            problem = _check_data(where["data"])
            if problem:
                return problem
    return ""


def _check_legacy(body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("to"), str) or not body["to"]:
        return "to is required"
    ttl = body.get("time_to_live", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
        return "InvalidTtl"
    if body.get("priority", "normal") not in ("normal", "high"):
        return "priority must be normal or high"
    return _check_data(body.get("data", {}))
