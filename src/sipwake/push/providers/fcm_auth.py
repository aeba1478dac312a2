"""OAuth2 access tokens for FCM HTTP v1 from a Google service account.

The service account signs a JWT assertion (RS256) that its ``token_uri`` trades for an
access token (RFC 7523 JWT-bearer grant). :class:`AccessTokenManager` decides, from a clock,
when to fetch: a token is refreshed ``anticipation`` seconds before it expires, and after a
failed refresh no new attempt is made for ``retry_interval`` seconds (a still-valid token
keeps being used meanwhile). Refreshes start when a push needs a token: while the current
token is still valid the push gets it at once and one refresh runs in the background; only
a push that finds no valid token waits for the refresh. Signing runs in a worker thread so
the event loop never waits on RSA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sipwake.clock import Clock
from sipwake.push import jws
from sipwake.push.providers.transport import HttpTransport, TransportError
from sipwake.push.request import PushError, token_prefix

log = logging.getLogger(__name__)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME = 3600  # the longest Google accepts


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The fields of a service-account JSON file that FCM v1 needs."""

    project_id: str
    client_email: str
    token_uri: str
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)
    private_key_id: str = ""

    @classmethod
    def from_json(cls, data: Any, source: str = "service account") -> ServiceAccount:
        """Check a parsed service-account file; errors name the file and the field."""
        if not isinstance(data, dict):
            raise PushError(f"{source}: expected a JSON object")
        if data.get("type", "service_account") != "service_account":
            raise PushError(f"{source}: type is {data.get('type')!r}, not service_account")
        values: dict[str, str] = {}
        for name in ("project_id", "client_email", "token_uri", "private_key"):
            value = data.get(name)
            if not isinstance(value, str) or not value:
                raise PushError(f"{source}: missing or empty {name}")
            values[name] = value
        try:
            key = serialization.load_pem_private_key(values["private_key"].encode(), None)
        except (ValueError, TypeError):
            raise PushError(f"{source}: private_key is not an unencrypted PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise PushError(f"{source}: private_key must be an RSA key")
        key_id = data.get("private_key_id", "")
        return cls(
            project_id=values["project_id"],
            client_email=values["client_email"],
            token_uri=values["token_uri"],
            private_key_id=key_id if isinstance(key_id, str) else "",
            private_key=key,
        )

    @classmethod
    def load(cls, path: str | Path) -> ServiceAccount:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PushError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PushError(f"{path}: not JSON: {exc}") from None
        return cls.from_json(data, str(path))

    def assertion(self, now: float, lifetime: int = ASSERTION_LIFETIME) -> str:
        """The signed JWT that the token endpoint trades for an access token."""
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": int(now),
            "exp": int(now) + lifetime,
        }
        header = {"kid": self.private_key_id} if self.private_key_id else None
        return jws.sign(claims, self.private_key, header=header)


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float  # monotonic
    refresh_at: float  # monotonic: anticipation before expiry, at least half-way through


class AccessTokenManager:
    """Keeps one project's access token fresh; one refresh at a time."""

    def __init__(
        self,
        account: ServiceAccount,
        transport: HttpTransport,
        clock: Clock,
        *,
        anticipation: float = 300.0,
        retry_interval: float = 60.0,
    ) -> None:
        self.account = account
        self._transport = transport
        self._clock = clock
        self._anticipation = anticipation
        self._retry_interval = retry_interval
        self._token: _Token | None = None
        self._next_attempt = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.last_error = ""
        self.refreshes = 0  # successful fetches, for stats and tests

    def _usable(self, now: float) -> _Token | None:
        token = self._token
        return token if token is not None and now < token.expires_at else None

    async def token(self, rejected: str | None = None) -> str:
        """A valid access token; ``rejected`` is one the server just refused (401).

        A token past its refresh time but not yet expired is returned at once while one
        refresh runs in the background. Without a valid token the call waits for the
        refresh, and raises :class:`PushError` when none can be had now (the reason of the
        last failure); the next attempt waits for the retry interval.
        """
        token = self._token
        now = self._clock.monotonic()
        if rejected is None and token is not None and now < token.refresh_at:
            return token.value  # the common case
        if rejected is not None and token is not None and token.value == rejected:
            self._token = token = None
        if token is not None and now < token.expires_at:
            if now >= self._next_attempt:
                self._start_refresh()
            return token.value
        if self._refreshing is None and now < self._next_attempt:
            raise PushError(f"no FCM access token: {self.last_error}")
        # shield: a caller that gives up does not cancel the refresh others wait for.
        await asyncio.shield(self._start_refresh())
        token = self._token
        if token is not None and self._clock.monotonic() < token.expires_at:
            return token.value
        raise PushError(f"no FCM access token: {self.last_error or 'token expired'}")

    def _start_refresh(self) -> asyncio.Task[None]:
        """The refresh under way, or a new one: at most one at a time."""
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._run_refresh())
        return task

    async def _run_refresh(self) -> None:
        try:
            await self._refresh()
        except Exception as exc:  # recorded in last_error; the task itself must not fail
            self.last_error = str(exc) if isinstance(exc, PushError) else repr(exc)
            self._next_attempt = self._clock.monotonic() + self._retry_interval
            log.warning(
                "FCM access token refresh for %s failed (next attempt in %ss): %s",
                self.account.project_id,
                self._retry_interval,
                self.last_error,
            )
        finally:
            self._refreshing = None

    async def wait_refreshed(self) -> None:
        """Wait for the refresh under way, if any (for shutdown and tests)."""
        task = self._refreshing
        if task is not None:
            await asyncio.shield(task)

    async def aclose(self) -> None:
        """Stop a refresh under way."""
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh(self) -> None:
        started = self._clock.monotonic()
        assertion = await asyncio.to_thread(self.account.assertion, self._clock.wall())
        body = urlencode({"grant_type": GRANT_TYPE, "assertion": assertion}).encode()
        try:
            resp = await self._transport.request(
                "POST",
                self.account.token_uri,
                [("content-type", "application/x-www-form-urlencoded")],
                body,
            )
        except TransportError as exc:
            raise PushError(f"token endpoint unreachable: {exc}") from None
        try:
            answer = json.loads(resp.body or b"{}")
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if resp.status != 200:
            detail = answer.get("error_description") or answer.get("error") or ""
            raise PushError(f"token endpoint answered {resp.status} {detail}".rstrip())
        value = answer.get("access_token")
        expires_in = answer.get("expires_in", 3600)
        if not isinstance(value, str) or not value:
            raise PushError("token endpoint answer has no access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise PushError("token endpoint answer has a non-numeric expires_in")
        lifetime = float(expires_in)
        # A token shorter-lived than the anticipation would be refreshed at every push.
        ahead = min(float(self._anticipation), lifetime / 2)
        self._token = _Token(value, started + lifetime, started + lifetime - ahead)
        self._next_attempt = float("-inf")
        self.last_error = ""
        self.refreshes += 1
        log.info(
            "FCM access token for %s refreshed (%s, valid %ss)",
            self.account.project_id,
            token_prefix(value),
            expires_in,
        )
