"""The records sipwake keeps: bindings, held messages, credentials, apps, rejected tokens.

Plain dataclasses with no storage logic, so every backend (SQLite, Redis) stores and
returns the same objects and the layers above never see a row or a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Received:
    """Where a REGISTER came from: the flow the proxy uses to reach the device (RFC 5626)."""

    transport: str  # "udp", "tcp", "tls", "ws", "wss"
    host: str
    port: int
    # Which local listening point received it (e.g. "udp://127.0.0.1:5060"), when known.
    local: str = ""


def push_key_for(provider: str, tokens: list[str] | tuple[str, ...]) -> str:
    """The canonical ``push_key`` of a device: its provider and its tokens.

    Tokens never contain white space (they travel as SIP URI parameters), so a space
    separates them; sorting makes ``voip&remote`` and ``remote&voip`` the same device.
    """
    if not provider or not tokens:
        raise ValueError("a push key needs a provider and at least one token")
    for part in (provider, *tokens):
        if not part or any(c.isspace() for c in part):
            raise ValueError("push provider and tokens must be non-empty without white space")
    return " ".join([provider, *sorted(set(tokens))])


def push_key_tokens(push_key: str) -> tuple[str, tuple[str, ...]]:
    """The provider and tokens of a key made by :func:`push_key_for`."""
    provider, *tokens = push_key.split(" ")
    return provider, tuple(tokens)


@dataclass(slots=True)
class Binding:
    """One registered contact of an address-of-record (RFC 3261 §10, RFC 5626, RFC 3327).

    ``contact`` is the Contact URI exactly as the device sent it, and ``contact_header``
    the whole Contact header value (with its parameters) that a 200 OK echoes back.
    ``match_key`` is the registrar's canonical form of the URI for RFC 3261 URI comparison;
    when empty the raw ``contact`` text is compared. ``push`` holds the contact's pn-* and
    related parameters (``None`` when the contact cannot be woken by a push), and
    ``push_key`` is :func:`push_key_for` of its provider and tokens.
    """

    aor: str
    contact: str
    expires_at: float
    registered_at: float
    contact_header: str = ""
    instance_id: str | None = None
    reg_id: int | None = None
    call_id: str = ""
    cseq: int = 0
    q: float | None = None
    path: list[str] = field(default_factory=list)
    received: Received | None = None
    user_agent: str = ""
    push: dict[str, str | None] | None = None
    push_key: str | None = None
    match_key: str = ""

    @property
    def key(self) -> str:
        """What identifies this binding within its AOR.

        RFC 5626 §6: the same ``+sip.instance`` and ``reg-id`` is the same flow; with an
        instance and no reg-id (RFC 5627) the instance alone identifies the device; without
        an instance the Contact URI does.
        """
        if self.instance_id:
            if self.reg_id is not None:
                return f"{self.instance_id};reg-id={self.reg_id}"
            return self.instance_id
        return self.match_key or self.contact

    @property
    def device(self) -> str:
        """The device this binding belongs to: its instance, or its key without one."""
        return self.instance_id or self.key

    @property
    def push_tokens(self) -> tuple[str, tuple[str, ...]] | None:
        """Provider and tokens from ``push_key``, or ``None`` for a binding without push."""
        return push_key_tokens(self.push_key) if self.push_key else None

    def lifetime(self) -> float:
        return self.expires_at - self.registered_at

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_json` reads it back unchanged."""
        data: dict[str, Any] = {
            "aor": self.aor,
            "contact": self.contact,
            "expires_at": self.expires_at,
            "registered_at": self.registered_at,
            "contact_header": self.contact_header,
            "instance_id": self.instance_id,
            "reg_id": self.reg_id,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "q": self.q,
            "path": list(self.path),
            "received": None,
            "user_agent": self.user_agent,
            "push": dict(self.push) if self.push is not None else None,
            "push_key": self.push_key,
            "match_key": self.match_key,
        }
        if self.received is not None:
            r = self.received
            data["received"] = [r.transport, r.host, r.port, r.local]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Binding:
        received = data.get("received")
        return cls(
            aor=data["aor"],
            contact=data["contact"],
            expires_at=data["expires_at"],
            registered_at=data["registered_at"],
            contact_header=data.get("contact_header", ""),
            instance_id=data.get("instance_id"),
            reg_id=data.get("reg_id"),
            call_id=data.get("call_id", ""),
            cseq=data.get("cseq", 0),
            q=data.get("q"),
            path=list(data.get("path") or []),
            received=Received(*received) if received else None,
            user_agent=data.get("user_agent", ""),
            push=data.get("push"),
            push_key=data.get("push_key"),
            match_key=data.get("match_key", ""),
        )


class UpsertResult:
    """What one :meth:`BindingStore.upsert` changed besides storing the new binding.

    ``previous`` is the binding it refreshed (same key); ``replaced`` are bindings of
    another device that carried one of the same push tokens; ``evicted`` are push bindings
    dropped because the AOR had more than ``max_push_devices`` push devices; ``expired``
    are bindings of the AOR found past their expiry and removed on the way.

    A store may hand ``previous`` over as its stored form and a decoder
    (:meth:`with_stored_previous`): it is decoded on first read, so a caller that only asks
    whether there was one (the registrar, on every refresh) never pays for it, and the
    store's writer does not either.
    """

    __slots__ = ("_previous", "_stored", "bindings", "evicted", "expired", "replaced")

    def __init__(
        self,
        previous: Binding | None = None,
        replaced: list[Binding] | None = None,
        evicted: list[Binding] | None = None,
        expired: list[Binding] | None = None,
        bindings: list[Binding] | None = None,
    ) -> None:
        self._previous = previous
        self._stored: tuple[Callable[[str], Binding], str] | None = None
        self.replaced: list[Binding] = replaced if replaced is not None else []
        self.evicted: list[Binding] = evicted if evicted is not None else []
        self.expired: list[Binding] = expired if expired is not None else []
        #: The AOR's live bindings right after the upsert, oldest first (what ``get(aor,
        #: binding.registered_at)`` would return), when the store had them at hand;
        #: ``None`` when the caller must ask :meth:`BindingStore.get`. May hold the
        #: binding passed in.
        self.bindings: list[Binding] | None = bindings

    def with_stored_previous(self, decode: Callable[[str], Binding], stored: str) -> None:
        """Set ``previous`` to ``decode(stored)``, computed when first read."""
        self._previous = None
        self._stored = (decode, stored)

    @property
    def previous(self) -> Binding | None:
        stored = self._stored
        if stored is not None:
            self._stored = None
            self._previous = stored[0](stored[1])
        return self._previous

    @previous.setter
    def previous(self, value: Binding | None) -> None:
        self._stored = None
        self._previous = value

    @property
    def refreshed(self) -> bool:
        """Whether a binding with the same key was replaced (without decoding it)."""
        return self._stored is not None or self._previous is not None

    @property
    def removed(self) -> list[Binding]:
        """Every binding that no longer exists (the previous one was updated, not removed)."""
        return [*self.replaced, *self.evicted, *self.expired]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UpsertResult):
            return NotImplemented
        return (self.previous, self.replaced, self.evicted, self.expired, self.bindings) == (
            other.previous,
            other.replaced,
            other.evicted,
            other.expired,
            other.bindings,
        )

    def __repr__(self) -> str:
        return (
            f"UpsertResult(previous={self.previous!r}, replaced={self.replaced!r}, "
            f"evicted={self.evicted!r}, expired={self.expired!r}, bindings={self.bindings!r})"
        )


@dataclass(slots=True)
class HeldMessage:
    """A SIP MESSAGE kept for a device that sleeps, until it registers or expires.

    ``request`` is the MESSAGE as received (bytes on the wire). ``target`` names the
    binding key or ``+sip.instance`` it is for, or is ``None`` for any device of the AOR.
    ``id`` and ``sequence`` are given by the store: ``sequence`` grows with arrival.
    """

    aor: str
    request: bytes
    received_at: float
    expires_at: float
    target: str | None = None
    id: str = ""
    sequence: int = 0


CREDENTIAL_TYPES = ("ios", "ios-token", "android", "webpush")


@dataclass(slots=True)
class Credential:
    """Push credentials of an app: public fields, plus a secret kept encrypted at rest.

    ``type`` is ``ios`` (certificate and private key), ``ios-token`` (.p8 key, key id, team
    id), ``android`` (service-account JSON) or ``webpush`` (VAPID key). ``secret`` is only
    filled when a credential is created or updated; reads leave it ``None`` and the clear
    secret is returned only by :meth:`CredentialStore.get_secret`.
    """

    alias: str
    type: str
    id: str = ""
    key_id: str = ""
    team_id: str = ""
    bundle_id: str = ""
    project_id: str = ""
    cert_subject: str = ""
    cert_expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    secret: bytes | None = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """The fields that may be shown (everything but the secret)."""
        return {
            "id": self.id,
            "alias": self.alias,
            "type": self.type,
            "key_id": self.key_id,
            "team_id": self.team_id,
            "bundle_id": self.bundle_id,
            "project_id": self.project_id,
            "cert_subject": self.cert_subject,
            "cert_expires_at": self.cert_expires_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(slots=True)
class App:
    """An app: its AppIds (iOS 13 apps have two, PushKit and remote), provider, credentials."""

    name: str
    provider: str
    app_ids: list[str] = field(default_factory=list)
    credential_ids: list[str] = field(default_factory=list)
    id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


def contact_uri_text(contact: str) -> str | None:
    """The URI of a Contact value as written: inside ``<>``, else up to the first ``;``
    (None when a quoted display name precedes it and makes it unclear). The registrar
    writes a binding's URI with this and the SQLite store leaves it out of a row when this
    gives it back from the Contact value, so both must use this one function."""
    if contact.startswith('"'):
        return None
    lt = contact.find("<")
    if lt >= 0:
        gt = contact.find(">", lt)
        return contact[lt + 1 : gt] if gt > lt else None
    return contact.partition(";")[0].strip()


def token_hash(provider: str, token: str) -> str:
    """How a rejected token is remembered: a hash, so the store never holds the token."""
    return hashlib.sha256(f"{provider}\n{token}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RejectedToken:
    """A token a provider refused as dead (APNs 410 Unregistered, FCM UNREGISTERED, …)."""

    provider: str
    token_hash: str
    token_prefix: str
    reason: str
    at: float


@dataclass(slots=True)
class Page(Generic[T]):
    """One page of a listing, with the total number of matching records."""

    items: list[T]
    total: int
    offset: int
    limit: int


# --- rules shared by every backend ---------------------------------------------------------


def check_page(offset: int, limit: int) -> None:
    """Refuse a page request the API could not have meant (the message names the field)."""
    if offset < 0:
        raise ValueError(f"offset: must not be negative, got {offset}")
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit: expected 1..1000, got {limit}")


def check_credential(credential: Credential) -> None:
    """Refuse a credential no backend may store."""
    if credential.type not in CREDENTIAL_TYPES:
        raise ValueError(
            f"type: expected one of {', '.join(CREDENTIAL_TYPES)}, got {credential.type!r}"
        )
    if credential.secret is not None and not isinstance(credential.secret, bytes):
        raise ValueError("secret: expected bytes")


def check_app(app: App) -> None:
    """Refuse an app no backend may store."""
    if not app.name:
        raise ValueError("name: must not be empty")
    if not app.app_ids:
        raise ValueError("app_ids: an app needs at least one AppId")
    if len(set(app.app_ids)) != len(app.app_ids):
        raise ValueError("app_ids: the same AppId is listed twice")


def credential_aad(credential_id: str) -> str:
    """The associated data sealing a secret to its record (a moved ciphertext won't open)."""
    return f"credential:{credential_id}"


def public_credential(c: Credential, cid: str, created: float, updated: float) -> Credential:
    """``c`` without its secret, under id ``cid`` and the given times."""
    return Credential(
        alias=c.alias,
        type=c.type,
        id=cid,
        key_id=c.key_id,
        team_id=c.team_id,
        bundle_id=c.bundle_id,
        project_id=c.project_id,
        cert_subject=c.cert_subject,
        cert_expires_at=c.cert_expires_at,
        created_at=created,
        updated_at=updated,
    )


def wire_bytes(text: str) -> bytes:
    """``text`` as the bytes it came from: what the SIP parser kept from bytes that were
    not UTF-8 (lone surrogates ``\\udc80``-``\\udcff``) goes back to those bytes. Raises
    ValueError, naming it, for a lone surrogate no bytes give."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise ValueError(
            f"text with {bad!r} at {exc.start} cannot be stored: a lone surrogate that "
            "no bytes on the wire give"
        ) from None
