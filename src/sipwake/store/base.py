"""The storage interfaces everything else uses; no SQL or Redis command lives outside store/.

Every method is a coroutine. A coroutine that changes data returns only once the change is
durable, so the registrar may answer 200 and the router 202 right after it returns.
"""

from __future__ import annotations

from typing import Protocol

from sipwake.store.model import (
    App,
    Binding,
    Credential,
    HeldMessage,
    Page,
    RejectedToken,
    UpsertResult,
)


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class StoreConflict(StoreError):
    """The change contradicts stored data (an AppId owned by another app, a used credential)."""


class StaleBinding(StoreConflict):
    """A REGISTER older than the stored binding: same Call-ID, CSeq not higher (RFC 3261
    §10.3 step 7; the registrar answers 500 with Retry-After)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (Redis restarting, unreachable, failing over).

    The change was not acknowledged: the caller answers 503 with ``Retry-After:
    retry_after`` (SIP) or 503 (HTTP) and the client tries again; the store reconnects by
    itself.
    """

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(StoreError):
    """The record named does not exist."""


class BindingStore(Protocol):
    """Registered contacts per address-of-record."""

    async def get(self, aor: str, now: float | None = None) -> list[Binding]:
        """The bindings of ``aor`` (not yet expired at ``now`` when given), oldest first."""
        ...

    async def upsert(self, binding: Binding, max_push_devices: int = 5) -> UpsertResult:
        """Add or refresh a binding and apply the registrar's rules in one atomic step.

        - a binding with the same key (contact URI, or ``+sip.instance`` and ``reg-id``)
          is refreshed (``previous``);
        - a binding of another device holding one of the same (provider, token) pairs is
          removed (``replaced``): the device registered again from another contact;
        - when the AOR then has more than ``max_push_devices`` push devices, the least
          recently registered ones (never this binding's device) are removed (``evicted``);
          0 means no limit;
        - bindings of the AOR expired at ``binding.registered_at`` are removed (``expired``).

        Raises :class:`StaleBinding`, changing nothing, when the stored binding with the
        same key has the same (non-empty) Call-ID and a CSeq not below ``binding.cseq``.
        """
        ...

    async def remove(self, aor: str, key: str) -> list[Binding]:
        """Remove a binding by its key (contact URI, or ``instance;reg-id=N``).

        A bare ``+sip.instance`` that is no binding's key removes every binding (flow) of
        that device. Returns what was removed (empty when nothing matched).
        """
        ...

    async def remove_all(self, aor: str) -> list[Binding]:
        """``Contact: *`` with ``Expires: 0``: remove every binding of ``aor``."""
        ...

    async def remove_by_push_token(self, provider: str, token: str) -> list[Binding]:
        """A provider rejected ``token`` as dead: remove every binding (any AOR) using it."""
        ...

    async def expire(self, now: float) -> list[Binding]:
        """Remove and return the bindings whose ``expires_at`` is at or before ``now``."""
        ...

    async def due_for_wakeup(self, now: float, threshold_percent: float) -> list[Binding]:
        """Push bindings alive at ``now`` that are past ``threshold_percent`` of their life."""
        ...

    async def count(self) -> int:
        """Number of stored bindings (expired ones included until :meth:`expire`)."""
        ...


class MessageStore(Protocol):
    """MESSAGE requests held for sleeping devices (the fork-late "push bucket")."""

    async def add(self, message: HeldMessage) -> str:
        """Keep ``message``; returns its id once it is durable (then 202 may be sent)."""
        ...

    async def pending(self, aor: str, now: float | None = None) -> list[HeldMessage]:
        """Messages held for ``aor`` in arrival order (unexpired at ``now`` when given)."""
        ...

    async def delete(self, message_id: str) -> bool:
        """The message was delivered: forget it. True only for the call that removed it."""
        ...

    async def expire(self, now: float) -> list[HeldMessage]:
        """Remove and return messages whose ``expires_at`` is at or before ``now``."""
        ...

    async def count(self, aor: str | None = None) -> int:
        """Number of held messages, for one AOR when given (to cap what one AOR may hold)."""
        ...


class CredentialStore(Protocol):
    """Push credentials; the secret is encrypted at rest and returned only by get_secret."""

    async def add(self, credential: Credential) -> Credential:
        """Store a credential whose ``secret`` is set; returns it with id and times filled
        in and without the secret."""
        ...

    async def get(self, credential_id: str) -> Credential | None:
        """The public part of one credential."""
        ...

    async def get_secret(self, credential_id: str) -> bytes:
        """The decrypted secret; raises :class:`NotFound` for an unknown id."""
        ...

    async def list(
        self,
        type: str | None = None,
        alias: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Credential]:
        """Credentials, oldest first, filtered by exact ``type`` and ``alias`` when given."""
        ...

    async def update(self, credential: Credential) -> Credential:
        """Replace the public fields (and the secret when ``secret`` is set)."""
        ...

    async def delete(self, credential_id: str) -> bool:
        """Remove a credential; :class:`StoreConflict` while an app uses it."""
        ...


class AppStore(Protocol):
    """Apps: AppIds mapped to a provider and credentials."""

    async def add(self, app: App) -> App:
        """Store a new app; every AppId belongs to at most one app and every credential id
        must exist (:class:`StoreConflict` otherwise)."""
        ...

    async def get(self, app_id: str) -> App | None:
        """An app by its record id."""
        ...

    async def find(self, app_identifier: str) -> App | None:
        """The app owning an AppId (a bundle id, an FCM project, …)."""
        ...

    async def list(
        self,
        provider: str | None = None,
        name: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[App]:
        """Apps, oldest first, filtered by exact ``provider`` and ``name`` when given."""
        ...

    async def update(self, app: App) -> App:
        """Replace an app's fields (same checks as :meth:`add`)."""
        ...

    async def delete(self, app_id: str) -> bool:
        """Remove an app; its credentials stay."""
        ...


class RejectedTokenStore(Protocol):
    """Tokens providers declared dead, remembered by hash (never in clear)."""

    async def add(self, provider: str, token: str, reason: str, at: float) -> RejectedToken:
        """Remember that ``provider`` rejected ``token`` (a second report updates it)."""
        ...

    async def get(self, provider: str, token: str) -> RejectedToken | None:
        """Whether ``token`` was rejected, and when and why."""
        ...

    async def remove(self, provider: str, token: str) -> bool:
        """Forget a rejection (the token was registered again and works)."""
        ...

    async def purge(self, before: float) -> int:
        """Forget rejections older than ``before``; returns how many."""
        ...

    async def list(self, offset: int = 0, limit: int = 50) -> Page[RejectedToken]:
        """Rejections, most recent first."""
        ...


class Store(Protocol):
    """Everything sipwake keeps, behind one object opened at start and closed at stop."""

    @property
    def bindings(self) -> BindingStore: ...

    @property
    def messages(self) -> MessageStore: ...

    @property
    def credentials(self) -> CredentialStore: ...

    @property
    def apps(self) -> AppStore: ...

    @property
    def rejected_tokens(self) -> RejectedTokenStore: ...

    async def close(self) -> None:
        """Finish queued writes and release files and connections."""
        ...
