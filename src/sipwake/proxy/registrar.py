"""The registrar (RFC 3261 §10.3) with RFC 5626 instances, RFC 3327 Path and RFC 8599 push.

A REGISTER becomes bindings in the store: added, refreshed or removed, with the push
parameters of each contact kept so that the router can wake the device later. The store
applies the rules that must be atomic (stale CSeq, the same push token registered from
another contact, ``max-push-devices`` eviction); this module checks the request, builds the
200 OK and tells listeners (the router) what changed through :class:`BindingEvent`. The
events of a REGISTER received through a transaction are told once its answer is handed to
the transaction, so a woken phone gets its 200 OK before the held INVITE or MESSAGE.

Timers (binding expiry, wake-up pushes) run on a :class:`~sipwake.clock.Clock`; tests call
:meth:`Registrar.expire_due` and :meth:`Registrar.send_wakeups` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

from sipwake.clock import Clock, SystemClock
from sipwake.config import Config
from sipwake.push.params import PushParamsError, parse_push_params
from sipwake.push.request import (
    Destination,
    Outcome,
    Provider,
    PushKind,
    PushRequest,
    PushResult,
    Service,
    token_prefix,
)
from sipwake.sip.headers import HeaderError, NameAddr, parse_uint, split_list
from sipwake.sip.message import Request, Response, make_response
from sipwake.sip.transaction import DEFAULT_PORTS, Address
from sipwake.sip.uri import SipUri, Uri, UriError, parse_uri
from sipwake.store.base import StaleBinding, Store, StoreError, StoreUnavailable
from sipwake.store.model import Binding, Received, contact_uri_text

if TYPE_CHECKING:
    from sipwake.proxy.auth import Authenticator
    from sipwake.push.service import PushService
    from sipwake.sip.endpoint import Endpoint
    from sipwake.sip.transaction import ServerTransaction

log = logging.getLogger("sipwake.registrar")

EventKind = Literal["added", "refreshed", "removed", "expired", "replaced", "evicted"]

#: Option tags this registrar understands in Require (RFC 3261 §8.2.2.3).
SUPPORTED_OPTIONS = frozenset({"path", "outbound", "gin"})
#: Contacts one REGISTER may carry: each is a store write.
MAX_CONTACTS = 20
#: 555 reason phrase (RFC 8599 §11.2).
PNS_NOT_SUPPORTED = "Push Notification Service Not Supported"


@dataclass(frozen=True)
class BindingEvent:
    """A change of one binding; the router forks held requests on added/refreshed.

    ``remote`` is true for a registration made through another node of a cluster sharing
    the store (Redis): the device's flow ends at that node.
    """

    kind: EventKind
    aor: str
    binding: Binding
    remote: bool = False


@dataclass(frozen=True)
class Target:
    """Where and how the proxy sends a request for one binding."""

    request_uri: str  # the Contact URI
    address: Address  # the registered flow, else the contact's (or first Path hop's) address
    route: list[str]  # Path header values, to become the Route set


class _Deferred:
    """Binding events of a REGISTER being answered, told once the answer is sent."""

    __slots__ = ("events", "open")

    def __init__(self) -> None:
        self.events: list[BindingEvent] = []
        self.open = True


#: Set while a REGISTER is being answered (per task, so per REGISTER).
_DEFERRED: contextvars.ContextVar[_Deferred | None] = contextvars.ContextVar(
    "sipwake_register_events", default=None
)


class RegisterError(Exception):
    """A REGISTER refused with ``status`` and ``reason`` (and extra header fields)."""

    def __init__(self, status: int, reason: str, **headers: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers


def normalize_aor(uri: str | Uri | NameAddr) -> str:
    """The address-of-record of a URI: ``sip:user@domain`` (scheme sip, no port/params).

    Raises :class:`ValueError` for a URI that is not ``sip:``/``sips:``.
    """
    if isinstance(uri, NameAddr):
        uri = uri.uri
    if isinstance(uri, str):
        try:
            uri = parse_uri(uri)
        except UriError as exc:
            raise ValueError(str(exc)) from None
    if not isinstance(uri, SipUri):
        raise ValueError(f"not a SIP URI: {uri.to_string()!r}")
    user = uri.user
    return f"sip:{user}@{uri.host}" if user else f"sip:{uri.host}"


def contact_match_key(uri: SipUri) -> str:
    """A canonical text of a Contact URI for RFC 3261 §19.1.4 comparison of bindings.

    Scheme, user, host and port decide; ``transport`` too (a strict parameter). Other
    parameters (pn-*, ob, ...) do not make a device a different binding.
    """
    user = uri.user or ""
    port = uri.port if uri.port is not None else ""
    transport = uri.transport or ""
    return f"{uri.scheme}:{user}@{uri.host}:{port};{transport}"


def supported_providers(config: Config) -> frozenset[str]:
    """RFC 8599 provider names this server can push to, from the configuration."""
    names: set[str] = set()
    if config.external.uri:
        return frozenset(p.value for p in Provider)
    if config.apple.enabled:
        names.update((Provider.APNS.value, Provider.APNS_DEV.value))
    if config.firebase.enabled:
        names.add(Provider.FCM.value)
    if config.webpush.vapid_private_key:
        names.add(Provider.WEBPUSH.value)
    for app in config.apps.values():
        names.add(app.provider)
        if app.provider == Provider.APNS.value:
            names.add(Provider.APNS_DEV.value)
    return frozenset(names)


def _vapid_public_key(config: Config) -> str | None:
    """The VAPID public key (base64url, uncompressed point) for ``+sip.vapid``, if any."""
    path = config.webpush.vapid_private_key
    if not path:
        return None
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(
            config.resolve_path(path).read_bytes(), password=None
        )
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    raw = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def push_destinations(binding: Binding) -> tuple[Destination, ...]:
    """The push destinations a stored binding carries (none when it has no push)."""
    if not binding.push:
        return ()
    try:
        return parse_push_params(binding.push).destinations
    except PushParamsError:
        return ()


def _supports(request: Request, tag: str) -> bool:
    for value in request.headers.get_all("supported"):
        if tag in (t.strip().lower() for t in value.split(",")):
            return True
    return False


def _first_hop_does_outbound(request: Request, path: list[str]) -> bool:
    """RFC 5626 §6: the flow ends at a hop that supports outbound: here (one Via, no
    Path), or at the edge proxy whose Path URI, the first, carries ``ob``."""
    if not path:
        return len(request.via_list) == 1
    try:
        first = NameAddr.parse(split_list(path[0])[0]).uri
    except (HeaderError, IndexError):
        return False
    return isinstance(first, SipUri) and "ob" in first.params


def _contact_params(contact: NameAddr) -> dict[str, str | None]:
    """URI and header parameters of a Contact (header ones win), for push parsing."""
    params: dict[str, str | None] = {}
    if isinstance(contact.uri, SipUri):
        params.update(contact.uri.params)
    params.update(contact.params)
    return params


class _ContactInfo(NamedTuple):
    """What a Contact value says whatever REGISTER carries it, once checked.

    Kept per value text (:attr:`Registrar._contacts`), so a refresh, which sends the same
    Contact again, skips parsing its URI and its RFC 8599 parameters. Only plain values
    (strings, numbers, a dict of strings), kept as a plain tuple: the garbage collector
    stops tracking such tuples (not named ones), so thousands of kept values add nothing
    to its passes.
    """

    expires: int | None  # its expires parameter, when it has one
    queried: str | None  # the provider of an RFC 8599 capability query (no pn-prid)
    uri_text: str  # the Contact URI as received
    instance: str | None
    reg_id: int | None
    # Its pn-* parameters when it can be woken: names and values in turn, not a dict (a
    # tuple holding a dict stays tracked by the garbage collector).
    push: tuple[str | None, ...] | None
    push_key: str | None
    match_key: str
    q: float | None  # its q parameter (RFC 3261 qvalue, 0 to 1), when it has one


#: Contact values whose checked form is kept (the oldest is dropped beyond this).
CONTACT_CACHE_SIZE = 10_000


class _ContactPlan(NamedTuple):
    """One Contact of a REGISTER after checking: what to store or remove."""

    expires: int
    raw: str  # the Contact value as received, without surrounding white space
    info: _ContactInfo


class Registrar:
    """RFC 3261 registrar on the store; emits :class:`BindingEvent` to listeners."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        clock: Clock | None = None,
        push: PushService | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.push = push
        self.auth = auth
        self.domains = frozenset(d.lower() for d in config.sip.domains)
        self.providers = supported_providers(config)
        self.vapid = _vapid_public_key(config)
        # The Feature-Caps value of each served provider (RFC 8599 §5.3), without pnsreg.
        self._caps = {name: f'*;+sip.pns="{name}"' for name in self.providers}
        if self.vapid and Provider.WEBPUSH.value in self._caps:
            self._caps[Provider.WEBPUSH.value] += f';+sip.vapid="{self.vapid}"'
        self.stats: Counter[str] = Counter()
        self._listeners: list[Callable[[BindingEvent], None]] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._loops: list[asyncio.Task[None]] = []
        # Last wake-up push per (aor, key): one push per binding lifetime stage.
        self._woken: dict[tuple[str, str], float] = {}
        # Checked Contact values by their text (see _ContactInfo), oldest first.
        self._contacts: dict[str, tuple[object, ...]] = {}
        if push is not None:
            push.add_token_rejected_listener(self.on_token_rejected)

    # ------------------------------------------------------------------ interface for F
    def add_listener(self, callback: Callable[[BindingEvent], None]) -> None:
        """Be told of every binding change (the router's ``on_binding_event``)."""
        self._listeners.append(callback)

    async def lookup(self, aor: str) -> list[Binding]:
        """The live bindings of ``aor``, oldest first."""
        return await self.store.bindings.get(aor, now=self.clock.wall())

    def target(self, binding: Binding) -> Target:
        """Where to send a request for ``binding``: its registered flow when known.

        The flow (the REGISTER's source) is the only address that crosses a NAT and the
        connection a TCP/TLS device keeps open; behind a Path it is the first hop's.
        """
        route = list(binding.path)
        r = binding.received
        if r is not None:
            address = Address(r.transport.upper(), r.host, r.port)
        else:
            hop = route[0] if route else binding.contact
            address = uri_address(hop)
        return Target(binding.contact, address, route)

    def is_local_domain(self, host: str) -> bool:
        return host.lower() in self.domains

    def _emit(self, kind: EventKind, aor: str, bindings: Iterable[Binding]) -> None:
        deferred = _DEFERRED.get()
        for binding in bindings:
            if kind not in ("added", "refreshed"):
                self._woken.pop((aor, binding.key), None)
            event = BindingEvent(kind, aor, binding)
            if deferred is not None and deferred.open:
                deferred.events.append(event)  # told once the REGISTER is answered
            else:
                self._dispatch(event)

    def _dispatch(self, event: BindingEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # one listener's bug must not break registration
                log.exception("binding listener failed on %s %s", event.kind, event.aor)

    # ------------------------------------------------------------------ REGISTER
    def on_register(
        self, endpoint: Endpoint, txn: ServerTransaction, request: Request, source: Address
    ) -> None:
        """Handle a REGISTER from the TU: the answer is sent once the store has it."""
        self._spawn(self._answer(endpoint, txn, request, source))

    async def _answer(
        self, endpoint: Endpoint, txn: ServerTransaction, request: Request, source: Address
    ) -> None:
        # The binding events of this REGISTER wait for its answer: a woken phone gets its
        # 200 OK before the held INVITE or MESSAGE the router sends on them.
        deferred = _Deferred()
        _DEFERRED.set(deferred)  # this task's own context
        try:
            try:
                response = await self.handle_register(request, source)
            except Exception:
                log.exception("REGISTER failed")
                response = make_response(request, 500, "Internal Server Error")
            try:
                endpoint.send_response(txn, response)
            except Exception:  # the endpoint closed while the store worked (shutdown)
                log.debug("REGISTER answer not sent", exc_info=True)
        finally:
            deferred.open = False  # a task started meanwhile tells its own at once
            for event in deferred.events:
                self._dispatch(event)

    async def handle_register(self, request: Request, source: Address) -> Response:
        """Process one REGISTER and return the response to send (sans transaction)."""
        try:
            return await self._register(request, source)
        except StoreUnavailable as exc:
            # Redis restarting or unreachable: nothing was acknowledged; the UA retries.
            log.warning("REGISTER answered 503: %s", exc)
            error = RegisterError(
                503, "Service Unavailable (storage)", Retry_After=str(exc.retry_after)
            )
        except RegisterError as exc:
            error = exc
        self.stats[f"register_{error.status}"] += 1
        response = make_response(request, error.status, error.reason)
        for name, value in error.headers.items():
            response.headers.add(name.replace("_", "-"), value)
        return response

    async def _register(self, request: Request, source: Address) -> Response:
        # RFC 3261 10.3 step 2: options we do not understand.
        unsupported = [
            tag
            for value in request.headers.get_all("require")
            for tag in (t.strip().lower() for t in value.split(","))
            if tag and tag not in SUPPORTED_OPTIONS
        ]
        if unsupported:
            raise RegisterError(420, "Bad Extension", Unsupported=", ".join(unsupported))
        to = request.to
        if to is None:
            raise RegisterError(400, "Missing To header")
        if not isinstance(to.uri, SipUri):
            raise RegisterError(404, "Not Found (To is not a SIP URI)")
        if not self.is_local_domain(to.uri.host):
            raise RegisterError(404, f"Not Found (domain {to.uri.host} is not served here)")
        aor = normalize_aor(to.uri)
        # Step 3 and 6: authentication, and only the owner may register the AOR.
        if self.auth is not None and self.auth.enabled:
            answer = self.auth.check(request, "www")
            if isinstance(answer, Response):
                return answer
            if to.uri.user is None or answer != to.uri.user:
                raise RegisterError(403, "Forbidden (not the owner of this address)")

        raw_values = request.headers.get_all("contact")
        if len(raw_values) > MAX_CONTACTS:
            raise RegisterError(403, f"Forbidden (more than {MAX_CONTACTS} contacts)")
        header_expires = request.headers.get("expires")
        kept = self._contacts
        known = [
            _ContactInfo._make(t) if (t := kept.get(raw)) is not None else None
            for raw in raw_values
        ]
        contacts: list[NameAddr | None]
        if all(known):  # every value was checked before (never "*"): no parsing
            contacts = [None] * len(known)
        else:
            parsed = request.contacts
            if any(c.is_wildcard for c in parsed):
                return await self._remove_all(request, aor, parsed, header_expires)
            contacts = list(parsed)
        plans = [
            self._plan(c, raw, header_expires, info)
            for c, raw, info in zip(contacts, raw_values, known, strict=True)
        ]
        now = self.clock.wall()
        call_id = request.call_id or ""
        cseq_field = request.cseq
        cseq = cseq_field.number if cseq_field is not None else 0
        path = request.headers.get_all("path") if request.headers.get("path") else []
        received = Received(source.transport.lower(), source.host, source.port)
        user_agent = request.headers.get("user-agent") or ""
        queried: set[str] = set()
        # The AOR's bindings after the last change, when the store returned them with it.
        current: list[Binding] | None = None
        for plan in plans:
            if plan.info.queried is not None:
                queried.add(plan.info.queried)
            if plan.expires == 0:
                key = self._key_for(plan)
                removed = await self.store.bindings.remove(aor, key)
                self._emit("removed", aor, removed)
                current = None
                continue
            binding = self._binding(plan, aor, now, call_id, cseq, path, received, user_agent)
            try:
                result = await self.store.bindings.upsert(
                    binding, self.config.registrar.max_push_devices
                )
            except StaleBinding as exc:
                raise RegisterError(
                    500, f"Server Internal Error ({exc})", Retry_After="1"
                ) from None
            except StoreUnavailable:
                raise
            except (StoreError, ValueError) as exc:
                log.error("cannot store a binding of %s: %s", aor, exc)
                raise RegisterError(
                    500, "Server Internal Error (storage)", Retry_After="5"
                ) from None
            if result.replaced:
                self._emit("replaced", aor, result.replaced)
            if result.evicted:
                self._emit("evicted", aor, result.evicted)
                for old in result.evicted:
                    # The key, not the Contact: a Contact's pn-prid is a token (a secret).
                    log.info("%s: push device %s evicted (max-push-devices)", aor, old.key)
            if result.expired:
                self._emit("expired", aor, result.expired)
            self._woken.pop((aor, binding.key), None)
            refreshed = result.refreshed  # the previous binding itself is not needed
            self._emit("refreshed" if refreshed else "added", aor, [binding])
            self.stats["bindings_refreshed" if refreshed else "bindings_added"] += 1
            current = result.bindings
        bindings = current if current is not None else await self.lookup(aor)
        outbound = any(p.info.instance and p.info.reg_id is not None for p in plans)
        if outbound:
            outbound = _first_hop_does_outbound(request, path)
        return self._ok(request, bindings, now, path, queried, outbound)

    def _plan(
        self,
        contact: NameAddr | None,
        raw: str,
        header_expires: str | None,
        info: _ContactInfo | None = None,
    ) -> _ContactPlan:
        """``contact`` is the parsed value, needed (and given) only when ``info``, the
        checked form of this value from an earlier REGISTER, is not known."""
        # The checks run in the order of RFC 3261 10.3 whether or not ``info`` is known.
        param: str | None = None
        if info is None:
            assert contact is not None
            if not isinstance(contact.uri, SipUri):
                raise RegisterError(400, "Bad Contact (not a SIP URI)")
            param = contact.params.get("expires")
        given: int | None
        if info is not None and info.expires is not None:
            expires = info.expires
        elif param is not None:
            given = _delta_seconds(param)
            if given is None:
                raise RegisterError(400, f"Bad Contact (invalid expires {param!r})")
            expires = given
        elif header_expires is not None:
            given = _delta_seconds(header_expires)
            if given is None:
                raise RegisterError(400, f"Bad Expires ({header_expires!r})")
            expires = given
        else:
            expires = self.config.registrar.default_expires
        reg = self.config.registrar
        if 0 < expires < reg.min_expires:
            raise RegisterError(423, "Interval Too Brief", Min_Expires=str(reg.min_expires))
        expires = min(expires, reg.max_expires)
        if info is None:
            assert contact is not None
            info = self._check_contact(contact, raw)
        return _ContactPlan(expires, raw.strip(), info)

    def _check_contact(self, contact: NameAddr, raw: str) -> _ContactInfo:
        """The request-independent checks of a Contact value; the result is kept."""
        if not isinstance(contact.uri, SipUri):
            raise RegisterError(400, "Bad Contact (not a SIP URI)")
        param = contact.params.get("expires")
        params = _contact_params(contact)
        provider = params.get("pn-provider")
        if provider is not None:
            name = (provider or "").strip().strip('"').lower()
            if name not in self.providers:
                raise RegisterError(555, PNS_NOT_SUPPORTED)
        try:
            push = parse_push_params(params)
        except PushParamsError as exc:
            raise RegisterError(400, f"Bad push parameters ({exc})") from None
        reg_id = contact.param("reg-id")
        if reg_id is not None and parse_uint(reg_id) is None:
            raise RegisterError(400, f"Bad Contact (invalid reg-id {reg_id!r})")
        q = _qvalue(contact.param("q"))
        text = raw.strip()
        uri_text = contact_uri_text(text) or contact.uri.to_string()
        instance = contact.param("+sip.instance")
        if not instance:
            instance, reg_no = None, None  # RFC 5626 §5.2: reg-id without instance is ignored
        else:
            reg_no = parse_uint(reg_id) if reg_id is not None else None
        pn: tuple[str | None, ...] | None = None
        push_key: str | None = None
        if push.has_push and push.provider is not None:
            pn = tuple(x for k, v in params.items() if k.lower().startswith("pn-") for x in (k, v))
            # push_key_for() without its character checks: parse_push_params checked tokens.
            tokens = sorted({d.token for d in push.destinations})
            push_key = " ".join([push.provider.value, *tokens])
        info = _ContactInfo(
            _delta_seconds(param) if param is not None else None,
            push.provider.value if push.capability_query and push.provider is not None else None,
            uri_text,
            instance,
            reg_no,
            pn,
            push_key,
            contact_match_key(contact.uri),
            q,
        )
        cache = self._contacts
        if len(cache) >= CONTACT_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[raw] = tuple(info)
        return info

    @staticmethod
    def _instance(plan: _ContactPlan) -> tuple[str | None, int | None]:
        return plan.info.instance, plan.info.reg_id

    def _key_for(self, plan: _ContactPlan) -> str:
        instance, reg_id = self._instance(plan)
        if instance:
            return f"{instance};reg-id={reg_id}" if reg_id is not None else instance
        return plan.info.match_key

    def _binding(
        self,
        plan: _ContactPlan,
        aor: str,
        now: float,
        call_id: str,
        cseq: int,
        path: list[str],
        received: Received,
        user_agent: str,
    ) -> Binding:
        instance, reg_id = self._instance(plan)
        info = plan.info
        header = plan.raw
        return Binding(
            aor=aor,
            contact=info.uri_text,
            expires_at=now + plan.expires,
            registered_at=now,
            contact_header=header,
            instance_id=instance,
            reg_id=reg_id,
            call_id=call_id,
            cseq=cseq,
            q=info.q,
            path=list(path),
            received=received,
            user_agent=user_agent,
            push=_pairs(info.push) if info.push is not None else None,
            push_key=info.push_key,
            match_key=info.match_key,
        )

    async def _remove_all(
        self, request: Request, aor: str, contacts: list[NameAddr], header_expires: str | None
    ) -> Response:
        # RFC 3261 10.3 step 6: "*" only alone and only with Expires: 0.
        if len(contacts) != 1 or header_expires is None or parse_uint(header_expires) != 0:
            raise RegisterError(400, "Bad Request (Contact: * needs Expires: 0 and no other)")
        removed = await self.store.bindings.remove_all(aor)
        self._emit("removed", aor, removed)
        self.stats["bindings_removed"] += len(removed)
        return self._ok(request, [], self.clock.wall(), [], set())

    def _ok(
        self,
        request: Request,
        bindings: list[Binding],
        now: float,
        path: list[str],
        queried: set[str],
        outbound: bool = False,
    ) -> Response:
        response = make_response(request, 200, "OK")
        h = response.headers
        for b in bindings:
            remaining = max(int(b.expires_at - now + 0.5), 0)
            value = _with_expires(b.contact_header or f"<{b.contact}>", remaining)
            h.add("Contact", value)
        if path and _supports(request, "path"):
            for value in path:
                h.add("Path", value)
        # RFC 5626 §6: "outbound" only for a REGISTER that got outbound processing; a
        # phone reads it as leave to send keep-alives (STUN on UDP) and rely on its flow.
        h.add("Supported", "path, outbound" if outbound else "path")
        names = {k.partition(" ")[0] for b in bindings if (k := b.push_key) is not None}
        if queried:
            names |= queried
        caps = self._caps
        for name in sorted(names) if len(names) > 1 else names:
            found = caps.get(name)
            if found is None:
                continue  # a provider no longer served (configuration changed)
            if self.config.push.register_wakeup_interval:
                lead = self._pnsreg(name, bindings)
                if lead is not None:
                    found += f';+sip.pnsreg="{lead}"'
            h.add("Feature-Caps", found)
        return response

    def _pnsreg(self, provider: str, bindings: list[Binding]) -> int | None:
        """RFC 8599 ``+sip.pnsreg``: the least time (s) before expiry at which a wake-up
        push is sent to this provider's bindings, or None when it cannot be promised.

        The check runs every register-wakeup-interval and pushes bindings past
        register-wakeup-threshold % of their lifetime, so the push comes at least
        ``lifetime * (100 - threshold) % - interval`` before expiry.
        """
        minutes = self.config.push.register_wakeup_interval
        if not minutes:
            return None
        share = (100 - self.config.push.register_wakeup_threshold) / 100
        leads = [
            int(b.lifetime() * share) - minutes * 60
            for b in bindings
            if (t := b.push_tokens) is not None and t[0] == provider
        ]
        return min(leads) if leads and min(leads) > 0 else None

    # ------------------------------------------------------------------ timers
    def start(self) -> None:
        """Run binding expiry and, when configured, wake-up pushes in the background.

        With a store shared by a cluster (Redis), registrations made through other nodes
        reach the listeners too, as ``remote`` events: a call held here rings there.
        """
        watch = getattr(self.store, "watch_bindings", None)
        if watch is not None:
            watch(self.on_remote_binding)
        self._loops.append(asyncio.get_running_loop().create_task(self._expiry_loop()))
        minutes = self.config.push.register_wakeup_interval
        if minutes and self.push is not None:
            self._loops.append(
                asyncio.get_running_loop().create_task(self._wakeup_loop(minutes * 60.0))
            )

    async def aclose(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loops.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _expiry_loop(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.expire_due()
            except StoreError as exc:
                log.warning("binding expiry failed: %s", exc)

    async def _wakeup_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.send_wakeups()
            except StoreError as exc:
                log.warning("wake-up pushes failed: %s", exc)

    def on_remote_binding(self, kind: str, binding: Binding) -> None:
        """Another node of the cluster stored ``binding`` (``added`` or ``refreshed``)."""
        if kind not in ("added", "refreshed"):
            return
        self._woken.pop((binding.aor, binding.key), None)
        event = BindingEvent(
            "refreshed" if kind == "refreshed" else "added", binding.aor, binding, True
        )
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # one listener's bug must not break the subscription
                log.exception("binding listener failed on remote %s %s", kind, binding.aor)

    async def expire_due(self) -> list[Binding]:
        """Remove bindings past their expiry and tell listeners (``expired``)."""
        expired = await self.store.bindings.expire(self.clock.wall())
        for b in expired:
            self._woken.pop((b.aor, b.key), None)
            self._emit("expired", b.aor, [b])
        return expired

    async def send_wakeups(self) -> list[PushResult]:
        """One background push to each push binding past register-wakeup-threshold.

        A binding gets one wake-up per registration: when the app registers again the
        binding is refreshed and becomes due again only later in its new lifetime.
        """
        if self.push is None:
            return []
        now = self.clock.wall()
        due = await self.store.bindings.due_for_wakeup(
            now, float(self.config.push.register_wakeup_threshold)
        )
        requests: list[PushRequest] = []
        for b in due:
            mark = (b.aor, b.key)
            if self._woken.get(mark) == b.registered_at:
                continue
            dest = _wakeup_destination(push_destinations(b))
            if dest is None:
                continue
            self._woken[mark] = b.registered_at
            requests.append(
                PushRequest(dest, PushKind.BACKGROUND, ttl=max(int(b.expires_at - now), 1))
            )
        if not requests:
            return []
        self.stats["wakeup_pushes"] += len(requests)
        return await self.push.send_many(requests)

    # ------------------------------------------------------------------ dead tokens
    def on_token_rejected(self, destination: Destination, result: PushResult) -> None:
        """A provider declared a token dead: remove the bindings that use it."""
        if result.outcome is not Outcome.TOKEN_REJECTED:
            return
        self._spawn(self.remove_token(destination.provider.value, destination.token, result))

    async def remove_token(self, provider: str, token: str, result: PushResult) -> list[Binding]:
        removed = await self.store.bindings.remove_by_push_token(provider, token)
        self.stats["dead_tokens"] += 1
        self.stats["dead_token_bindings_removed"] += len(removed)
        log.warning(
            "%s rejected token %s (%s): %d binding(s) removed",
            provider,
            token_prefix(token),
            result.reason or result.status,
            len(removed),
        )
        with contextlib.suppress(StoreError):
            await self.store.rejected_tokens.add(
                provider, token, result.reason or "rejected", self.clock.wall()
            )
        for b in removed:
            self._emit("removed", b.aor, [b])
        return removed

    # ------------------------------------------------------------------ helpers
    def _spawn(self, coro: Coroutine[object, None, object]) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _delta_seconds(text: str) -> int | None:
    """An expires value (RFC 3261 delta-seconds); huge ones are clamped later, not refused."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 12 else 10**12


def _pairs(flat: tuple[str | None, ...]) -> dict[str, str | None]:
    """A dict of names and values given in turn (names are never None)."""
    return {str(name): value for name, value in zip(flat[::2], flat[1::2], strict=True)}


def _qvalue(text: str | None) -> float | None:
    """A Contact's q parameter: a number from 0 to 1 (RFC 3261 §20.10), or 400."""
    if text is None:
        return None
    try:
        q = float(text)
    except ValueError:
        q = -1.0
    if not 0.0 <= q <= 1.0:  # NaN and infinities fail too
        raise RegisterError(400, f"Bad Contact (invalid q {text!r}: expected 0 to 1)")
    return q


def _wakeup_destination(dests: tuple[Destination, ...]) -> Destination | None:
    """A background push goes to the remote token: iOS forbids PushKit without a call."""
    for dest in dests:
        if dest.service is Service.REMOTE:
            return dest
    return None


_EXPIRES_PARAM_RE = re.compile(r";\s*expires\s*=\s*[^;]*", re.IGNORECASE)


def _with_expires(contact_header: str, remaining: int) -> str:
    """The Contact value as registered, with ``expires`` set to the time left.

    Text surgery rather than parse and print: this runs for every contact of every 200 OK.
    """
    head, gt, params = contact_header.rpartition(">")
    if not gt:  # an addr-spec without <>: its parameters are header parameters
        head, semi, params = contact_header.partition(";")
        params = semi + params
    if "expires" in params.lower():
        params = _EXPIRES_PARAM_RE.sub("", params)
    return f"{head}{gt}{params};expires={remaining}"


def uri_address(text: str) -> Address:
    """The address a SIP URI (Contact or Route) designates, without DNS: host and port."""
    na_text = text.strip()
    if na_text.startswith("<") or '"' in na_text:
        uri = NameAddr.parse(na_text).uri
    else:
        uri = parse_uri(na_text)
    if not isinstance(uri, SipUri):
        raise ValueError(f"not a SIP URI: {text!r}")
    transport = (uri.transport or ("tls" if uri.secure else "udp")).upper()
    host = uri.host.strip("[]")
    port = uri.port or DEFAULT_PORTS.get(transport, 5060)
    return Address(transport, host, port)


__all__ = [
    "BindingEvent",
    "RegisterError",
    "Registrar",
    "Target",
    "contact_match_key",
    "normalize_aor",
    "push_destinations",
    "supported_providers",
    "uri_address",
]
