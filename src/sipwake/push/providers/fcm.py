"""Firebase Cloud Messaging: the HTTP v1 API and the deprecated legacy API.

Both send the data-only message that Flexisip sends and the Linphone Android app reads:
``android.priority`` high for calls and messages (normal for background wake-ups and
call-ended pushes), a TTL capped at four weeks, and string data keys ``uuid``,
``from-uri``, ``display-name``, ``call-id``, ``sip-from``, ``loc-key``, ``loc-args``,
``send-time``, ``custom-payload``, when the push has a message text, ``text``, and for
a group-chat invitation ``chat-room-addr`` (its chat room, as in the APNs payload).
``loc-key`` is the call, message or group-chat key, or for a call-ended push the device's
final-alert text (``pn-missing-call-str`` ...) or ``IC_MISSED`` and its siblings.

HTTP v1 (``[push.firebase] service-accounts``) authenticates with OAuth2 access tokens from
:mod:`fcm_auth`. The legacy API (``projects-api-keys``, ``Authorization: key=…``,
``/fcm/send``) was shut down by Google in 2024; it stays for self-hosted compatible servers.
Pushes go over HTTP/2 (one multiplexed connection per server) unless a transport is given;
the OAuth2 token endpoint is reached over HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sipwake.clock import Clock, SystemClock
from sipwake.config import Config
from sipwake.push.providers.fcm_auth import AccessTokenManager, ServiceAccount
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

MAX_TTL = 28 * 24 * 3600  # FCM refuses a TTL above four weeks
RETRYABLE = frozenset({429, 500, 502, 503, 504})

Sleep = Callable[[float], Awaitable[None]]


def loc_key(request: PushRequest) -> str:
    """The alert string id the app localises (``IC_MSG`` for calls by default)."""
    if request.kind in (PushKind.CALL, PushKind.RINGING):
        return request.strings.call_loc_key
    if request.kind is PushKind.MESSAGE:
        s = request.strings
        return s.groupchat_loc_key if request.group_chat else s.message_loc_key
    if request.kind is PushKind.CALL_ENDED:
        return request.final_loc_key()
    return ""


def data_fields(request: PushRequest, now_wall: float) -> dict[str, str]:
    """The data keys every FCM (and Web Push) message carries; all values are strings.

    ``text`` (only when the push has one) is the message text: Flexisip sends none, so the
    key is sipwake's own; an app that fetches the message over SIP can ignore it.
    """
    from_uri, display_name = request.shown_caller()
    sender = display_name or from_uri
    fields = {
        "uuid": request.uuid,
        "from-uri": from_uri,
        "display-name": display_name,
        "call-id": request.call_id,
        "sip-from": sender,
        "loc-key": loc_key(request),
        "loc-args": sender,
        "send-time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now_wall)),
        "custom-payload": json.dumps(
            dict(request.custom_payload or {}), separators=(",", ":"), ensure_ascii=False
        ),
    }
    if request.text:
        fields["text"] = request.text  # the message body, for the app to show
    if request.kind is PushKind.MESSAGE and (request.chat_room_addr or request.mutable_content):
        # As in the APNs payload: the chat room of a group-chat invitation.
        fields["chat-room-addr"] = request.chat_room_addr
    return fields


#: Kinds that show something at once (a ringing call, a message). FCM lowers the priority
#: of apps whose high-priority messages show no notification, so silent wake-ups and
#: call-ended pushes go at normal priority.
HIGH_PRIORITY = frozenset({PushKind.CALL, PushKind.RINGING, PushKind.MESSAGE})


def priority_of(request: PushRequest) -> str:
    """``high`` for calls and messages, ``normal`` for background and call-ended pushes."""
    return "high" if request.kind in HIGH_PRIORITY else "normal"


def ttl_of(request: PushRequest) -> int:
    return max(0, min(int(request.ttl), MAX_TTL))


def v1_message(request: PushRequest, now_wall: float) -> dict[str, Any]:
    """The ``messages:send`` body for one push."""
    return {
        "message": {
            "token": request.destination.token,
            "android": {
                "priority": priority_of(request),
                "ttl": f"{ttl_of(request)}s",
                "data": data_fields(request, now_wall),
            },
        }
    }


def legacy_message(request: PushRequest, now_wall: float) -> dict[str, Any]:
    """The legacy ``/fcm/send`` body for one push."""
    return {
        "to": request.destination.token,
        "priority": priority_of(request),
        "time_to_live": ttl_of(request),
        "data": data_fields(request, now_wall),
    }


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _v1_error(body: bytes) -> tuple[str, str]:
    """(status or FCM errorCode, message) of a v1 error answer."""
    error = _json(body).get("error")
    if not isinstance(error, dict):
        return "", body[:200].decode("utf-8", "replace")
    code = str(error.get("status", ""))
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
            break
    return code, str(error.get("message", ""))


class _FcmBase:
    """What v1 and legacy share: transport, retries with backoff, result mapping."""

    name = "fcm"

    def __init__(
        self,
        *,
        server: str,
        transport: HttpTransport,
        clock: Clock | None,
        backoff: Backoff | None,
        sleep: Sleep | None,
        rng: Callable[[], float] | None,
    ) -> None:
        self.server = server.rstrip("/")
        self._transport = transport
        self._clock: Clock = clock or SystemClock()
        self._backoff = backoff or Backoff()
        self._sleep: Sleep = sleep or asyncio.sleep
        self._rng = rng or random.random
        self._inflight = InFlight()

    def _accepts_provider(self, destination: Destination) -> bool:
        return destination.provider is Provider.FCM

    async def _post(self, url: str, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
        return await self._transport.request("POST", url, headers, body)

    async def _retry_wait(self, retry: int, resp: HttpResponse | None) -> bool:
        """Sleep before retry number ``retry``; False when the retries are spent."""
        asked = retry_after(resp.headers, self._clock.wall()) if resp is not None else None
        delay = self._backoff.delay(retry, self._rng(), asked)
        if delay is None:
            return False
        await self._sleep(delay)
        return True

    async def send(self, request: PushRequest) -> PushResult:
        """Send one push; concurrent sends share the connection."""
        self._inflight.enter()
        try:
            return await self._send(request)
        finally:
            self._inflight.leave()

    async def _send(self, request: PushRequest) -> PushResult:  # pragma: no cover - abstract
        raise NotImplementedError

    async def aclose(self) -> None:
        """Let pushes under way finish, then close the connections."""
        await self._inflight.wait_idle()
        await self._transport.aclose()


class FcmV1Provider(_FcmBase):
    """FCM HTTP v1 (``/v1/projects/<project>/messages:send``) with service accounts."""

    def __init__(
        self,
        accounts: Mapping[str, ServiceAccount],
        *,
        server: str = "https://fcm.googleapis.com",
        transport: HttpTransport | None = None,
        token_transport: HttpTransport | None = None,
        clock: Clock | None = None,
        anticipation: float = 300.0,
        refresh_interval: float = 60.0,
        backoff: Backoff | None = None,
        sleep: Sleep | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            server=server,
            transport=transport or make_transport("http2"),
            clock=clock,
            backoff=backoff,
            sleep=sleep,
            rng=rng,
        )
        self._token_transport = token_transport or make_transport("http")
        managers: dict[str, AccessTokenManager] = {}
        self._managers: dict[str, AccessTokenManager] = {}
        for project, account in accounts.items():
            # Projects named by number and by id may share one file: one token for both.
            key = f"{account.client_email}|{account.project_id}"
            if key not in managers:
                managers[key] = AccessTokenManager(
                    account,
                    self._token_transport,
                    self._clock,
                    anticipation=anticipation,
                    retry_interval=refresh_interval,
                )
            self._managers[project] = managers[key]

    async def aclose(self) -> None:
        await super().aclose()
        for manager in set(self._managers.values()):
            await manager.aclose()
        await self._token_transport.aclose()

    def manager(self, project: str) -> AccessTokenManager:
        return self._managers[project]

    def accepts(self, destination: Destination) -> bool:
        return self._accepts_provider(destination) and destination.app_id in self._managers

    async def _send(self, request: PushRequest) -> PushResult:
        dest = request.destination
        manager = self._managers.get(dest.app_id)
        if manager is None:
            return PushResult(Outcome.FAILED, f"no service account for project {dest.app_id!r}")
        url = f"{self.server}/v1/projects/{manager.account.project_id}/messages:send"
        body = json.dumps(v1_message(request, self._clock.wall())).encode()
        rejected: str | None = None
        auth_retried = False
        retry = 0
        while True:
            try:
                access = await manager.token(rejected)
            except PushError as exc:
                return PushResult(Outcome.FAILED, str(exc))
            headers = [("authorization", f"Bearer {access}"), ("content-type", "application/json")]
            try:
                resp = await self._post(url, headers, body)
            except TransportError as exc:
                if not exc.maybe_processed:  # never reached FCM: sending again is safe
                    retry += 1
                    if await self._retry_wait(retry, None):
                        continue
                return PushResult(Outcome.FAILED, str(exc))
            if resp.status == 200:
                name = str(_json(resp.body).get("name", ""))
                log.debug("FCM v1 push to %s sent: %s", dest.token_prefix(), name)
                return PushResult(Outcome.SENT, provider_id=name, status=200)
            code, message = _v1_error(resp.body)
            # THIRD_PARTY_AUTH_ERROR: the project's APNs or Web Push credential is wrong;
            # the access token is fine and a new one would be refused the same way.
            if resp.status == 401 and not auth_retried and code != "THIRD_PARTY_AUTH_ERROR":
                auth_retried, rejected = True, access
                continue
            if resp.status in RETRYABLE:
                retry += 1
                if await self._retry_wait(retry, resp):
                    continue
            result = self._failure(resp.status, code, message)
            log.info(
                "FCM v1 push to %s: %s %s %s",
                dest.token_prefix(),
                resp.status,
                code,
                result.outcome,
            )
            return result

    @staticmethod
    def _failure(status: int, code: str, message: str) -> PushResult:
        reason = f"{code}: {message}" if code and message else code or message or f"HTTP {status}"
        if code == "UNREGISTERED" or (status == 404 and not code):
            return PushResult(Outcome.TOKEN_REJECTED, reason, status=status)
        return PushResult(Outcome.FAILED, reason, status=status)


class FcmLegacyProvider(_FcmBase):
    """The deprecated legacy FCM API (``/fcm/send`` with a server key per project)."""

    name = "fcm-legacy"

    def __init__(
        self,
        api_keys: Mapping[str, str],
        *,
        server: str = "https://fcm.googleapis.com",
        transport: HttpTransport | None = None,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
        sleep: Sleep | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(
            server=server,
            transport=transport or make_transport("http2"),
            clock=clock,
            backoff=backoff,
            sleep=sleep,
            rng=rng,
        )
        self._keys = dict(api_keys)

    def accepts(self, destination: Destination) -> bool:
        return self._accepts_provider(destination) and destination.app_id in self._keys

    async def _send(self, request: PushRequest) -> PushResult:
        dest = request.destination
        key = self._keys.get(dest.app_id)
        if key is None:
            return PushResult(Outcome.FAILED, f"no legacy API key for project {dest.app_id!r}")
        url = f"{self.server}/fcm/send"
        body = json.dumps(legacy_message(request, self._clock.wall())).encode()
        headers = [("authorization", f"key={key}"), ("content-type", "application/json")]
        retry = 0
        while True:
            try:
                resp = await self._post(url, headers, body)
            except TransportError as exc:
                if not exc.maybe_processed:  # never reached FCM: sending again is safe
                    retry += 1
                    if await self._retry_wait(retry, None):
                        continue
                return PushResult(Outcome.FAILED, str(exc))
            if resp.status in RETRYABLE:
                retry += 1
                if await self._retry_wait(retry, resp):
                    continue
            result = self._result(resp)
            log.debug("FCM legacy push to %s: %s", dest.token_prefix(), result.outcome)
            return result

    @staticmethod
    def _result(resp: HttpResponse) -> PushResult:
        if resp.status == 401:
            return PushResult(Outcome.FAILED, "server key refused (401)", status=401)
        if resp.status != 200:
            text = resp.body[:200].decode("utf-8", "replace").strip()
            return PushResult(
                Outcome.FAILED, f"HTTP {resp.status} {text}".strip(), status=resp.status
            )
        answer = _json(resp.body)
        results = answer.get("results")
        first = results[0] if isinstance(results, list) and results else {}
        if not isinstance(first, dict):
            first = {}
        error = first.get("error")
        if error in ("NotRegistered", "InvalidRegistration"):
            return PushResult(Outcome.TOKEN_REJECTED, str(error), status=200)
        if error:
            return PushResult(Outcome.FAILED, str(error), status=200)
        message_id = first.get("message_id")
        if message_id is None:
            return PushResult(Outcome.FAILED, "answer has neither message_id nor error", status=200)
        return PushResult(Outcome.SENT, provider_id=str(message_id), status=200)


def load_service_accounts(
    table: Mapping[str, str], resolve: Callable[[str], Any] = str
) -> dict[str, ServiceAccount]:
    """Read ``[push.firebase] service-accounts``; errors name the project and the file."""
    accounts: dict[str, ServiceAccount] = {}
    for project, path in table.items():
        try:
            accounts[project] = ServiceAccount.load(resolve(path))
        except PushError as exc:
            raise PushError(f"[push.firebase] service-accounts.{project}: {exc}") from None
    return accounts


class FcmProvider:
    """FCM as one provider: HTTP v1 for projects with a service account, else legacy."""

    name = "fcm"

    def __init__(self, v1: FcmV1Provider | None, legacy: FcmLegacyProvider | None = None) -> None:
        self.v1 = v1
        self.legacy = legacy

    def _route(self, destination: Destination) -> _FcmBase | None:
        for provider in (self.v1, self.legacy):
            if provider is not None and provider.accepts(destination):
                return provider
        return None

    def accepts(self, destination: Destination) -> bool:
        return self._route(destination) is not None

    async def send(self, request: PushRequest) -> PushResult:
        provider = self._route(request.destination)
        if provider is None:
            project = request.destination.app_id
            return PushResult(
                Outcome.FAILED, f"no FCM service account or API key for project {project!r}"
            )
        return await provider.send(request)

    async def aclose(self) -> None:
        for provider in (self.v1, self.legacy):
            if provider is not None:
                await provider.aclose()


def build_fcm_provider(
    config: Config,
    *,
    service_accounts: Mapping[str, str] | None = None,
    api_keys: Mapping[str, str] | None = None,
    server: str | None = None,
    ca_file: str | None = None,
    clock: Clock | None = None,
) -> FcmProvider | None:
    """FCM from ``[push.firebase]`` (paths relative to the config file) plus overrides.

    Returns None when FCM is disabled or has no credentials; raises :class:`PushError`
    naming the key or file that cannot be used.
    """
    fb = config.firebase
    if not fb.enabled:
        return None
    files = {p: str(config.resolve_path(f)) for p, f in fb.service_accounts.items()}
    files.update(service_accounts or {})
    keys = {**fb.projects_api_keys, **(api_keys or {})}
    if not files and not keys:
        return None
    base = (server or fb.server).rstrip("/")
    ca = ca_file
    if ca is None and config.push.ca_file:
        ca = str(config.resolve_path(config.push.ca_file))
    v1 = legacy = None
    if files:
        v1 = FcmV1Provider(
            load_service_accounts(files),
            server=base,
            transport=make_transport("http2", ssl_context=ssl_context(ca)),
            token_transport=make_transport("http", ssl_context=ssl_context(ca)),
            clock=clock,
            anticipation=fb.token_expiration_anticipation_time,
            refresh_interval=fb.default_refresh_interval,
        )
    if keys:
        log.warning("[push.firebase] projects-api-keys: the legacy FCM API is deprecated")
        legacy = FcmLegacyProvider(
            keys,
            server=base,
            transport=make_transport("http2", ssl_context=ssl_context(ca)),
            clock=clock,
        )
    return FcmProvider(v1, legacy)
