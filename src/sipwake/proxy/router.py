"""The router: a stateful forking proxy (RFC 3261 §16) that holds requests for sleeping apps.

An INVITE or MESSAGE for one of our AORs is forked to every binding the registrar has
(one client transaction per binding, to its registered flow, with its Path as Route).
Bindings with push parameters get a push from the :mod:`~sipwake.push.strategy`. While
the request waits (``call-fork-timeout`` for calls), every registration of the callee
that the registrar reports (a new binding, or the same instance from a new contact)
gets a new branch at once: this is *fork-late*, the request held in the "push bucket".

Responses are forwarded with best-response selection (§16.7); a 2xx or 6xx cancels the
other branches; a CANCEL from the caller answers 487 and cancels every branch. A MESSAGE
still unanswered after ``message-accept-timeout`` is stored durably and answered 202; it
is delivered to each device of the AOR, in order and once per device, when that device
registers (the rules are in :mod:`sipwake.proxy.messages`), even after a restart; a
MESSAGE one device answers 2xx while others sleep is held for the sleeping ones; a MESSAGE
for an AOR that already has held ones is queued behind them at once, so order holds.
In-dialog requests follow their Route set (loose routing, §16.4/§16.12); the router
Record-Routes dialog-creating requests so that ACK, BYE and re-INVITE pass through it.

Timers run on a :class:`~sipwake.proxy.timers.TimerQueue` over the router's clock, so tests
drive them with a FakeClock and :meth:`Router.tick`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import re
import secrets
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sipwake.clock import Clock, SystemClock
from sipwake.config import Config, ConfigError
from sipwake.proxy.core import branch_is_ours, loop_branch
from sipwake.proxy.messages import HeldMessages, device_of
from sipwake.proxy.registrar import (
    BindingEvent,
    Registrar,
    Target,
    normalize_aor,
    uri_address,
)
from sipwake.proxy.timers import LoopTimers, Timer
from sipwake.push.params import PushParamsError, parse_push_params
from sipwake.push.request import CallEndReason, Outcome, PushRequest
from sipwake.push.strategy import (
    Caller,
    DevicePush,
    PushStrategy,
    RequestKind,
    chat_room_of,
    end_reason_of,
    is_group_chat_invite,
    no_push_reason,
)
from sipwake.sip.headers import HeaderError, Headers, NameAddr, Via
from sipwake.sip.message import Request, Response, make_response
from sipwake.sip.transaction import (
    DEFAULT_PORTS,
    Address,
    ClientTransaction,
    ServerTransaction,
    Transaction,
)
from sipwake.sip.transport import bracket
from sipwake.sip.uri import SipUri, UriError
from sipwake.store.base import Store, StoreError, StoreUnavailable
from sipwake.store.model import Binding

if TYPE_CHECKING:
    from sipwake.push.service import PushService
    from sipwake.sip.endpoint import Endpoint

log = logging.getLogger("sipwake.router")

#: Methods that create dialogs: the proxy Record-Routes them (RFC 3261 §16.6 step 4).
DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER", "NOTIFY"})
#: Final responses that say "the device did not answer" rather than "the user said no".
UNREACHED = frozenset({408, 480, 503})
#: Seconds a ringing branch may last after call-fork-timeout (RFC 3261 Timer C, > 3 min).
TIMER_C = 181.0
#: Seconds the router's work under way may take to settle when it stops.
SHUTDOWN_GRACE = 2.0
#: Preferred responses within a class (RFC 3261 §16.7 step 6).
PREFERRED = (401, 407, 415, 420, 484)


def parse_status_line(text: str) -> tuple[int, str] | None:
    """``"110 Push sent"`` into (110, "Push sent"); None for an empty setting."""
    text = text.strip()
    if not text:
        return None
    code, _, reason = text.partition(" ")
    if not code.isdigit() or not 101 <= int(code) <= 199:
        raise ConfigError(
            f"[push] push-sent-response: expected a provisional status line such as "
            f"'110 Push sent', got {text!r}"
        )
    return int(code), reason.strip() or "Push sent"


class _Branch:
    """One client transaction of a forked request."""

    __slots__ = (
        "address",
        "cancel_pending",
        "cancel_reason",
        "cancelled",
        "contact",
        "ctx",
        "device",
        "device_id",
        "final",
        "ghost",
        "provisional",
        "push_key",
        "request",
        "txn",
    )

    def __init__(
        self,
        ctx: _Context,
        txn: ClientTransaction,
        request: Request,
        address: Address,
        binding: Binding | None,
    ) -> None:
        self.ctx = ctx
        self.txn = txn
        self.request = request
        self.address = address
        self.device = binding.device if binding is not None else ""
        #: The device for held MESSAGE delivery (:func:`~sipwake.proxy.messages.device_of`).
        self.device_id = device_of(binding) if binding is not None else ""
        self.contact = binding.contact if binding is not None else request.uri
        self.push_key = binding.push_key if binding is not None else None
        self.provisional = False
        self.final: int | None = None
        self.cancelled = False
        self.cancel_pending = False
        self.cancel_reason: str | None = None
        #: Delivered after the caller cancelled (iOS CallKit): cancelled once it rings.
        self.ghost = False

    @property
    def pending(self) -> bool:
        return self.final is None


class _Context:
    """One request the proxy forwards: its server transaction, branches, pushes, timers."""

    def __init__(
        self,
        endpoint: Endpoint,
        txn: ServerTransaction,
        request: Request,
        aor: str,
        kind: RequestKind | None,
    ) -> None:
        self.endpoint = endpoint
        self.txn = txn
        self.request = request
        self.aor = aor
        self.kind = kind
        self.branches: list[_Branch] = []
        self.finals: list[Response] = []
        self.done = False
        self.pushes: dict[str, DevicePush] = {}
        self.push_timers: dict[str, Timer] = {}
        #: Push devices (push keys) that have not answered yet: fork-late waits for them.
        self.sleeping: set[str] = set()
        #: Devices that gave a final answer: a later registration does not ring them again.
        self.answered: set[str] = set()
        #: After a CANCEL: iOS VoIP devices woken by PushKit, to ring then cancel.
        self.linger: set[str] = set()
        self.timer: Timer | None = None
        self.push_sent_reported = False
        #: 180 Ringing sent for a push that rings the phone (pn-silent=0).
        self.ringing_reported = False
        #: The To tag of the responses we make ourselves in this context (made once).
        self.to_tag: str | None = None
        self.held: str | None = None
        #: A MESSAGE being stored for the devices that have not taken it.
        self.holding = False
        #: MESSAGE: the devices of the fork (device_of → binding), and those that took it.
        self.devices: dict[str, Binding] = {}
        self.delivered: set[str] = set()
        self.no_push: str | None = None
        self.cancel_reason: str | None = None
        #: Past call-fork-timeout with a device ringing: only its answer is awaited.
        self.ringing_only = False

    @property
    def is_invite(self) -> bool:
        return self.request.method == "INVITE"


class Router:
    """Forks requests to bindings, sends pushes, and holds requests for late registrations.

    Wiring (``sipwake serve``)::

        router = Router(config, registrar, push=push_service)  # store: registrar's
        core = ProxyCore(config, registrar, router, auth)
        endpoint = Endpoint(core, ...)
        router.attach(endpoint)
        await router.start()   # held MESSAGEs from before a restart, expiry
        ...
        await router.aclose()

    It subscribes itself to the registrar's binding events.
    """

    def __init__(
        self,
        config: Config,
        registrar: Registrar,
        *,
        push: PushService | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.registrar = registrar
        self.push = push
        self.clock: Clock = clock or registrar.clock or SystemClock()
        store = store if store is not None else registrar.store
        self.held: HeldMessages | None = HeldMessages(config, store, self.clock)
        self.strategy = PushStrategy(config, self.clock)
        self.timers = LoopTimers(self.clock)
        self.push_sent = parse_status_line(config.push.push_sent_response)
        self.domains = frozenset(d.lower() for d in config.sip.domains)
        self.endpoint: Endpoint | None = None
        self.stats: Counter[str] = Counter()
        self._by_txn: dict[ServerTransaction, _Context] = {}
        self._by_aor: dict[str, set[_Context]] = {}
        self._branches: dict[ClientTransaction, _Branch] = {}
        self._waiters: dict[ClientTransaction, asyncio.Future[int]] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._progress = asyncio.Event()
        self._ids = itertools.count(1)
        #: Key of the MAC in our Via branches: a response to forward statelessly must
        #: carry a branch we made (anyone can write "z9hG4bKlp").
        self._branch_key = secrets.token_bytes(32)
        #: Key of the MAC in our flow tokens, derived for that use alone.
        self._flow_key = hmac.new(self._branch_key, b"sipwake flow token", hashlib.sha256).digest()
        #: Client transactions of cancelled calls a woken device answered (rare).
        self._ghosts: set[ClientTransaction] = set()
        registrar.add_listener(self.on_binding_event)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, endpoint: Endpoint) -> None:
        """The endpoint used for requests that no incoming request started (fork-late)."""
        self.endpoint = endpoint

    async def start(self) -> None:
        """Look for MESSAGEs held before a restart; expire held ones in the background."""
        if self.held is not None:
            await self.held.start()

    def tick(self) -> int:
        """Fire the router's timers that are due (tests drive a FakeClock with this)."""
        return self.timers.tick()

    async def drain(self) -> None:
        """Wait for the work under way (lookups, pushes, storage) to finish or to wait
        for a device's answer (held MESSAGE deliveries), for tests and orderly stops."""
        while True:
            busy = [t for t in self._tasks if not t.done()]
            waiting = sum(1 for w in self._waiters.values() if not w.done())
            if not busy or (waiting and len(busy) <= waiting):
                return
            self._progress.clear()
            progress = asyncio.ensure_future(self._progress.wait())
            await asyncio.wait([*busy, progress], return_when=asyncio.FIRST_COMPLETED)
            progress.cancel()

    async def aclose(self) -> None:
        """Stop: the work under way gets ``SHUTDOWN_GRACE`` seconds to reach a resting
        point first, so that a held MESSAGE a device just took is recorded as delivered
        (else it would be delivered again after a restart); waits for devices' answers
        are not awaited."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE):
                await self.drain()
        if self.held is not None:
            await self.held.aclose()
        self.timers.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ TU hooks
    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        if self.endpoint is None:
            self.endpoint = endpoint
        try:
            self._route(endpoint, txn, request)
        except (HeaderError, UriError, ValueError) as exc:
            if txn is not None:
                endpoint.respond(txn, 400, f"Bad Request ({exc})")

    def _pop_own_routes(self, endpoint: Endpoint, fwd: Request) -> tuple[Address, int] | None:
        """§16.4: our own Route entries are consumed (we may appear twice: double RR).

        Returns the flow named by the last of them when it carries a flow token: the
        WebSocket connection of a browser (its address and serial), whose Contact host
        cannot be reached.
        """
        flow: tuple[Address, int] | None = None
        while True:
            routes = fwd.routes
            if not routes:
                return flow
            top = routes[0].uri
            if not (isinstance(top, SipUri) and self._is_me(endpoint, top)):
                return flow
            flow = self._flow_of(top)
            fwd.headers.remove_first("route")

    def _flow_token(self, endpoint: Endpoint, flow: Address) -> str:
        """A Record-Route user part naming the connection of ``flow`` (RFC 5626 §5.2's flow
        token), signed so that nobody can make us send into another client's connection.

        It names the connection, not only its address (the serial of the connection that
        is open there now; 0, which names none, when there is none): once it closes,
        another client may get the same public ip:port behind a NAT."""
        conn = endpoint.transports.connections.get(flow)
        serial = getattr(conn, "serial", 0)
        raw = f"{flow.transport}|{flow.host}|{flow.port}|{serial}".encode()
        mac = hmac.new(self._flow_key, raw, hashlib.sha256).hexdigest()[:20]
        return f"{_FLOW_PREFIX}{raw.hex()}{mac}"

    def _flow_of(self, uri: SipUri) -> tuple[Address, int] | None:
        """The flow (address, connection serial) of a Route URI we wrote with
        :meth:`_flow_token`, or None."""
        # Only the exact shape we write (ASCII hex, a 20-digit MAC) is a token: the user
        # part is percent-decoded peer input, and compare_digest refuses non-ASCII text.
        match = _FLOW_TOKEN.fullmatch(uri.user or "")
        if match is None:
            return None
        raw = bytes.fromhex(match[1])
        good = hmac.new(self._flow_key, raw, hashlib.sha256).hexdigest()[:20]
        if not hmac.compare_digest(match[2].encode("ascii"), good.encode("ascii")):
            return None
        fields = raw.decode("ascii", "replace").split("|")
        if len(fields) != 4 or not (fields[2].isdigit() and fields[3].isdigit()):
            return None
        transport, host, port, serial = fields
        return Address(transport, host, int(port)), int(serial)

    def _flow_open(self, endpoint: Endpoint, flow: tuple[Address, int]) -> bool:
        """Whether the connection a flow token names is still open (RFC 5626 §5.2)."""
        address, serial = flow
        conn = endpoint.transports.connections.get(address)
        return conn is not None and conn.is_open() and getattr(conn, "serial", 0) == serial

    def _route(self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request) -> None:
        fwd = self._copy(request)
        named = self._pop_own_routes(endpoint, fwd)
        routes = fwd.routes
        flow: Address | None = None
        if named is not None and not routes:
            if not self._flow_open(endpoint, named):
                # The connection is gone: whatever now has its address is someone else.
                if txn is not None:
                    endpoint.respond(txn, 430, "Flow Failed")  # RFC 5626 §5.2, §11
                return
            flow = named[0]
        if txn is None:  # ACK for a 2xx: stateless, along the dialog's route
            mf = fwd.max_forwards
            if mf is not None and mf <= 0:
                return  # §16.3 step 3; an ACK is never answered (no 483), only dropped
            # §16.6 step 3: one less, or 70 when the request had none.
            fwd.headers.set("Max-Forwards", str(mf - 1 if mf is not None else 70))
            address = self._next_hop(fwd, routes, flow)
            self._add_via(endpoint, fwd, address.transport, request)
            endpoint.send_stateless(fwd, address)
            return
        to = request.to
        in_dialog = to is not None and to.tag is not None
        uri = request.parsed_uri
        local = isinstance(uri, SipUri) and (
            uri.host.lower() in self.domains or self._is_me(endpoint, uri)
        )
        if local and not routes and not in_dialog and isinstance(uri, SipUri) and not uri.user:
            endpoint.respond(txn, 404, "Not Found (no user in the Request-URI)")
            return
        if routes or in_dialog or not local:
            address = self._next_hop(fwd, routes, flow)
            ctx = _Context(endpoint, txn, request, "", None)
            self._by_txn[txn] = ctx
            if self._forward(ctx, fwd, address, None, record_route=not in_dialog) is None:
                self._finish(ctx, self._answer(ctx, 503, "Service Unavailable"))
            return
        aor = normalize_aor(uri)
        kind = {"INVITE": RequestKind.CALL, "MESSAGE": RequestKind.MESSAGE}.get(request.method)
        ctx = _Context(endpoint, txn, request, aor, kind)
        ctx.no_push = no_push_reason(request) if kind is not None else "not a call or message"
        self._by_txn[txn] = ctx
        self._by_aor.setdefault(aor, set()).add(ctx)
        self._spawn(self._fork(ctx))

    def on_response(
        self,
        endpoint: Endpoint,
        txn: ClientTransaction | None,
        response: Response,
        source: Address,
    ) -> None:
        if txn is None:
            self._forward_stray(endpoint, response)
            return
        waiter = self._waiters.get(txn)
        if waiter is not None:
            if response.status >= 200:
                del self._waiters[txn]
                if not waiter.done():
                    waiter.set_result(response.status)
            return
        branch = self._branches.get(txn)
        if branch is None:
            if txn in self._ghosts:
                return  # a retransmitted 2xx of a call we hung up: never the caller's
            if txn.is_invite and 200 <= response.status < 300:
                self._forward_stray(endpoint, response)  # a 2xx retransmission (RFC 6026)
            return  # else a response to one of our CANCELs
        self._on_branch_response(branch, response)

    def on_cancel(self, endpoint: Endpoint, txn: ServerTransaction, cancel: Request) -> None:
        target = endpoint.layer.find_cancel_target(cancel, txn.source.transport)
        if target is None:
            endpoint.respond(txn, 481, "Call/Transaction Does Not Exist")
            return
        endpoint.respond(txn, 200)
        ctx = self._by_txn.get(target)
        if ctx is None or ctx.done:
            if target.last_response is None or target.last_response.status < 200:
                endpoint.respond(target, 487, "Request Terminated")
            return
        self.stats["cancelled"] += 1
        self._finish(
            ctx,
            self._answer(ctx, 487, "Request Terminated"),
            end_reason_of(cancel),
            cancel.headers.get("reason"),
            caller_cancelled=True,
        )

    def on_timeout(self, endpoint: Endpoint, txn: Transaction) -> None:
        self._unreached(txn, 408)

    def on_transport_error(self, endpoint: Endpoint, txn: Transaction) -> None:
        self._unreached(txn, 503)

    def _unreached(self, txn: Transaction, status: int) -> None:
        if not isinstance(txn, ClientTransaction):
            return
        waiter = self._waiters.pop(txn, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(status)
            return
        branch = self._branches.pop(txn, None)
        if branch is None or branch.final is not None:
            return
        branch.final = status
        ctx = branch.ctx
        if ctx.kind is None and not ctx.done and len(ctx.branches) == 1:
            # A plain forward (in-dialog, relay): the caller learns of the failure.
            self._finish(ctx, self._answer(ctx, status))
            return
        self._check_done(ctx)

    # ------------------------------------------------------------------ forking
    async def _fork(self, ctx: _Context) -> None:
        try:
            bindings = await self.registrar.lookup(ctx.aor)
        except StoreError as exc:
            log.error("lookup of %s failed: %s", ctx.aor, exc)
            self._finish(ctx, _store_failure(ctx.request, exc, self._tag(ctx)))
            return
        if ctx.done:
            return  # cancelled meanwhile
        if not bindings:
            self._finish(ctx, self._answer(ctx, 480, "Temporarily Unavailable"))
            return
        queue = (
            ctx.kind is RequestKind.MESSAGE
            and ctx.no_push is None
            and self.held is not None
            and self.held.holding(ctx.aor)
        )
        for binding in bindings:
            ctx.devices[device_of(binding)] = binding
            self._plan_push(ctx, binding)
            if not queue:
                self._branch_to(ctx, binding)
        if queue:
            # Older MESSAGEs wait for this AOR: this one goes behind them, in order.
            await self._hold(ctx)
            return
        router = self.config.router
        if ctx.is_invite:
            ctx.timer = self.timers.after(router.call_fork_timeout, lambda: self._timed_out(ctx))
        elif ctx.kind is RequestKind.MESSAGE and ctx.sleeping:
            ctx.timer = self.timers.after(router.message_accept_timeout, lambda: self._accept(ctx))
        self._check_done(ctx)

    def _plan_push(self, ctx: _Context, binding: Binding) -> None:
        key = binding.push_key
        if key is None or not binding.push or ctx.kind is None or key in ctx.pushes:
            return
        if ctx.no_push is not None or self.push is None:
            return  # nothing will wake it: fork-late does not wait for it
        ctx.sleeping.add(key)
        try:
            params = parse_push_params(binding.push)
        except PushParamsError:
            return
        request = ctx.request
        frm = request.from_
        group_chat = ctx.kind is RequestKind.CALL and is_group_chat_invite(request)
        caller = Caller(
            call_id=request.call_id or "",
            from_uri=frm.uri.to_string() if frm is not None else "",
            display_name=(frm.display_name or "") if frm is not None else "",
            group_chat=group_chat,
            chat_room_addr=chat_room_of(request) if group_chat else "",
        )
        plan = self.strategy.plan(ctx.kind, params, caller)
        if plan is None:
            return
        ctx.pushes[key] = plan
        self._arm_push(ctx, key, plan)

    def _arm_push(self, ctx: _Context, key: str, plan: DevicePush) -> None:
        deadline = plan.next_deadline()
        if deadline is None:
            ctx.push_timers.pop(key, None)
            return
        if deadline <= self.clock.monotonic():  # [push] timeout 0: no timer round trip
            self._push_due(ctx, key)
            return
        ctx.push_timers[key] = self.timers.at(deadline, lambda: self._push_due(ctx, key))

    def _push_due(self, ctx: _Context, key: str) -> None:
        plan = ctx.pushes.get(key)
        if plan is None:
            return
        for request in plan.due(self.clock.monotonic()):
            self._spawn(self._send_push(ctx, request, key))
        self._arm_push(ctx, key, plan)

    async def _send_push(self, ctx: _Context, request: PushRequest, key: str = "") -> None:
        assert self.push is not None
        self.stats[f"push_{request.kind.value}"] += 1
        result = await self.push.send(request)
        if result.outcome is Outcome.TOKEN_REJECTED and key:
            # The device cannot be woken any more: do not wait for it until the timeout.
            self._stop_pushes(ctx, key)
            ctx.sleeping.discard(key)
            self._check_done(ctx)
            return
        if not result.ok or not ctx.is_invite or ctx.done:
            return
        if not ctx.push_sent_reported and self.push_sent:
            ctx.push_sent_reported = True
            code, reason = self.push_sent
            ctx.endpoint.send_response(ctx.txn, self._answer(ctx, code, reason))
        plan = ctx.pushes.get(key)
        if (
            plan is not None
            and plan.rings
            and not ctx.ringing_reported
            and not any(b.provisional for b in ctx.branches)
        ):
            # pn-silent=0: the push rings the phone, so the caller hears ringback now.
            ctx.ringing_reported = True
            ctx.endpoint.send_response(ctx.txn, self._answer(ctx, 180, "Ringing"))

    def _stop_pushes(self, ctx: _Context, key: str | None) -> None:
        if key is None:
            return
        plan = ctx.pushes.get(key)
        if plan is not None:
            plan.stop()
        timer = ctx.push_timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _next_hop(self, fwd: Request, routes: list[NameAddr], flow: Address | None) -> Address:
        """The next Route, else the flow our last Route named, else the Request-URI."""
        if routes:
            return uri_address(routes[0].uri.to_string())
        return flow if flow is not None else self._ruri(fwd)

    def _branch_to(self, ctx: _Context, binding: Binding) -> _Branch | None:
        target = self.registrar.target(binding)
        fwd = self._copy(ctx.request)
        fwd.uri = target.request_uri
        return self._forward(ctx, fwd, target.address, binding, target=target)

    def _forward(
        self,
        ctx: _Context,
        fwd: Request,
        address: Address,
        binding: Binding | None,
        *,
        target: Target | None = None,
        record_route: bool = True,
    ) -> _Branch | None:
        """Send one branch of ``ctx`` (``fwd`` is already a copy we may change)."""
        endpoint = ctx.endpoint
        h = fwd.headers
        mf = fwd.max_forwards
        h.set("Max-Forwards", str(mf - 1 if mf is not None else 70))
        if target is not None and target.route:
            _prepend(h, "Route", target.route)
        if record_route and fwd.method in DIALOG_CREATING:
            source = ctx.txn.source
            inbound = source.transport
            rr = [self._record_route(endpoint, inbound, source)]
            # RFC 5658: one per side when the transports differ; and one per side when
            # the far side is a browser, so its entry can name its WebSocket flow.
            if address.transport.upper() != inbound.upper() or address.transport in _WS:
                rr.insert(0, self._record_route(endpoint, address.transport, address))
            _prepend(h, "Record-Route", rr)
        self._add_via(endpoint, fwd, address.transport, ctx.request)
        try:
            txn = endpoint.send_request(fwd, address)
        except (OSError, ValueError) as exc:
            log.warning("cannot forward %s to %s: %s", fwd.method, address, exc)
            return None
        branch = _Branch(ctx, txn, fwd, address, binding)
        ctx.branches.append(branch)
        self._branches[txn] = branch
        self.stats["branches"] += 1
        return branch

    # ------------------------------------------------------------------ responses
    def _on_branch_response(self, branch: _Branch, response: Response) -> None:
        ctx = branch.ctx
        status = response.status
        if status == 100:
            if branch.cancel_pending:  # any provisional allows the CANCEL (§9.1)
                branch.cancel_pending = False
                self._send_cancel(branch)
            return
        if status < 200:
            branch.provisional = True
            self._stop_pushes(ctx, branch.push_key)  # the device is awake
            if branch.cancel_pending:
                branch.cancel_pending = False
                self._send_cancel(branch)
                return
            if branch.ghost or branch.cancelled or ctx.done:
                return
            self._relay(ctx, response)
            return
        self._branches.pop(branch.txn, None)
        branch.final = status
        if status < 300:
            self._stop_pushes(ctx, branch.push_key)
            if branch.ghost:
                self._hang_up(branch, response)
                return
            if ctx.kind is RequestKind.MESSAGE and branch.device_id:
                self._message_taken(ctx, branch)
            self._relay_2xx(ctx, response)
            if not ctx.done:
                self._finish(
                    ctx,
                    None,
                    CallEndReason.ANSWERED_ELSEWHERE,
                    'SIP;cause=200;text="Call completed elsewhere"',
                    answered_by=branch.push_key,
                )
            return
        if status not in UNREACHED:
            if branch.push_key is not None:
                ctx.sleeping.discard(branch.push_key)
                self._stop_pushes(ctx, branch.push_key)
            if branch.device:
                ctx.answered.add(branch.device)
            if not branch.ghost and not branch.cancelled:
                ctx.finals.append(response)
        if ctx.done or branch.ghost:
            return
        if status >= 600:
            self._finish(
                ctx,
                response,
                CallEndReason.DECLINED_ELSEWHERE,
                f'SIP;cause={status};text="{response.reason or "Declined"}"',
            )
            return
        if ctx.kind is None and len(ctx.branches) == 1:
            self._finish(ctx, response)
            return
        self._check_done(ctx)

    def _check_done(self, ctx: _Context) -> None:
        """Answer once nothing can change the outcome any more (§16.7 step 5)."""
        if ctx.done:
            return
        if any(b.pending and not b.ghost and not b.cancelled for b in ctx.branches):
            return
        if ctx.sleeping and ctx.kind is not None:
            if ctx.kind is RequestKind.CALL and self.config.router.fork_late:
                return  # wait for the device to register, until call-fork-timeout
            if ctx.kind is RequestKind.MESSAGE and self.held is not None:
                return  # stored and answered 202 at message-accept-timeout
        self._finish(ctx, self._best(ctx))

    def _best(self, ctx: _Context) -> Response:
        finals = ctx.finals
        if not finals:
            return self._answer(ctx, 480, "Temporarily Unavailable")
        six = [r for r in finals if r.status >= 600]
        if six:
            return six[0]
        lowest = min(r.status // 100 for r in finals)
        same = [r for r in finals if r.status // 100 == lowest]
        for code in PREFERRED:
            for r in same:
                if r.status == code:
                    return r
        best = same[0]
        if best.status == 503:  # §16.7 step 6: 503 becomes 500 towards the caller
            return self._answer(ctx, 500, "Server Internal Error")
        return best

    def _timed_out(self, ctx: _Context) -> None:
        """call-fork-timeout: nobody answered and no sleeping device registered in time.

        A device that is ringing keeps ringing (its user may still answer): the call then
        waits for its answer, bounded by Timer C (RFC 3261 §16.6 step 11), and no longer
        for sleeping devices.
        """
        if ctx.done:
            self._forget(ctx)
            return
        self.stats["call_fork_timeout"] += 1
        ringing = [b for b in ctx.branches if b.pending and b.provisional and not b.cancelled]
        if ringing and not ctx.ringing_only:
            ctx.ringing_only = True
            for branch in ctx.branches:
                if branch.pending and not branch.provisional:
                    self._cancel(branch, None)
            for key in list(ctx.sleeping):
                self._stop_pushes(ctx, key)
            ctx.sleeping.clear()
            ctx.timer = self.timers.after(TIMER_C, lambda: self._timed_out(ctx))
            return
        best = self._best(ctx) if ctx.finals else None
        self._finish(ctx, best or self._answer(ctx, 480, "Temporarily Unavailable"))

    def _finish(
        self,
        ctx: _Context,
        response: Response | None,
        end: CallEndReason = CallEndReason.MISSED,
        cancel_reason: str | None = None,
        *,
        caller_cancelled: bool = False,
        answered_by: str | None = None,
    ) -> None:
        """Send the final response (unless a 2xx went already), cancel branches, end pushes."""
        if ctx.done:
            return
        ctx.done = True
        if ctx.timer is not None:
            ctx.timer.cancel()
            ctx.timer = None
        if response is not None:
            self._relay(ctx, response)
        for branch in ctx.branches:
            if branch.pending and not branch.ghost:
                self._cancel(branch, cancel_reason)
        for key, plan in ctx.pushes.items():
            timer = ctx.push_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            if key == answered_by:
                plan.stop()
                continue
            voip_woken = plan.is_voip and plan.sent > 0 and key in ctx.sleeping
            final = plan.finish(end)
            if final is not None:
                self._spawn(self._send_push(ctx, final))
            if caller_cancelled and voip_woken and self.config.router.fork_late:
                ctx.linger.add(key)
        if ctx.linger:
            # iOS requires a woken VoIP app to report a call: when it registers, it gets
            # the INVITE and then its CANCEL, so CallKit shows a missed call.
            ctx.timer = self.timers.after(
                self.config.router.call_fork_timeout, lambda: self._forget(ctx)
            )
            return
        self._forget(ctx)

    def _forget(self, ctx: _Context) -> None:
        ctx.linger.clear()
        if ctx.timer is not None:
            ctx.timer.cancel()
            ctx.timer = None
        self._by_txn.pop(ctx.txn, None)
        group = self._by_aor.get(ctx.aor)
        if group is not None:
            group.discard(ctx)
            if not group:
                del self._by_aor[ctx.aor]

    def _tag(self, ctx: _Context) -> str:
        """Our To tag for the responses we make in ``ctx`` (RFC 3261 §8.2.6.2: every one
        but 100 has one): the same for all of them, so the early dialog of our 180 is the
        one our 480 or 487 ends. A response forwarded from a branch keeps its own tag."""
        if ctx.to_tag is None:
            ctx.to_tag = secrets.token_hex(6)
        return ctx.to_tag

    def _answer(self, ctx: _Context, status: int, reason: str | None = None) -> Response:
        """A response of ours to the request of ``ctx``, with our To tag for it."""
        tag = self._tag(ctx) if status > 100 else None
        return make_response(ctx.request, status, reason, to_tag=tag)

    def _relay(self, ctx: _Context, response: Response) -> None:
        """Forward a branch's response (or send ours) through the server transaction."""
        if response.headers.get("via") != ctx.request.headers.get("via"):
            response.headers.remove_first("via")  # a branch's response: our Via on top
        if ctx.to_tag is not None and response.status > 100:
            to = response.to
            if to is not None and to.tag is None:
                # A branch's answer without a tag (a 408 made for a silent one) after our
                # 180 or 110: it ends the early dialog those began.
                to.tag = ctx.to_tag
                response.headers.set("To", to.to_string())
        ctx.endpoint.send_response(ctx.txn, response)

    def _relay_2xx(self, ctx: _Context, response: Response) -> None:
        """Every 2xx goes to the caller (§16.7 step 5), after the final response too."""
        last = ctx.txn.last_response
        if last is not None and last.status >= 300:
            response.headers.remove_first("via")
            ctx.endpoint.send_stateless(response, ctx.txn.reply_to)
            return
        self._relay(ctx, response)

    def _forward_stray(self, endpoint: Endpoint, response: Response) -> None:
        """A 2xx retransmission after our client transaction ended: stateless (§16.11)."""
        if not 200 <= response.status < 300:
            return
        vias = response.via_list
        if len(vias) < 2 or not branch_is_ours(vias[0].branch, self._branch_key):
            return  # not a request we forwarded: never reflect it (RFC 3261 §18.1.2)
        response.headers.remove_first("via")
        # Only over UDP or a flow still open: a stray response never opens a connection.
        endpoint.send_stateless(response, _via_address(vias[1]), connect=False)

    # ------------------------------------------------------------------ cancelling
    def _cancel(self, branch: _Branch, reason: str | None) -> None:
        if branch.cancelled or branch.final is not None:
            return
        branch.cancelled = True
        branch.cancel_reason = reason
        if branch.request.method != "INVITE":
            return  # a non-INVITE cannot be cancelled: its answer is ignored
        if branch.provisional:
            self._send_cancel(branch)
        else:
            branch.cancel_pending = True  # RFC 3261 §9.1: CANCEL after a provisional only

    def _send_cancel(self, branch: _Branch) -> None:
        req = branch.request
        h = Headers()
        h.add("Via", req.headers.get_values("via")[0])
        for value in req.headers.get_values("route"):
            h.add("Route", value)
        h.add("Max-Forwards", "70")
        for name in ("From", "To", "Call-ID"):
            h.add(name, req.headers.get(name) or "")
        cseq = req.cseq
        h.add("CSeq", f"{cseq.number if cseq else 1} CANCEL")
        if branch.cancel_reason:
            h.add("Reason", branch.cancel_reason)
        h.add("Content-Length", "0")
        cancel = Request("CANCEL", req.uri, h)
        try:
            branch.ctx.endpoint.send_request(cancel, branch.address)
        except (OSError, ValueError) as exc:
            log.warning("cannot send CANCEL to %s: %s", branch.address, exc)

    def _hang_up(self, branch: _Branch, response: Response) -> None:
        """The device answered a call the caller had cancelled: ACK, then BYE it."""
        req = branch.request
        contacts = response.contacts
        uri = contacts[0].uri.to_string() if contacts else req.uri
        cseq = req.cseq.number if req.cseq else 1
        for method, number in (("ACK", cseq), ("BYE", cseq + 1)):
            h = Headers()
            h.add("Max-Forwards", "70")
            h.add("From", req.headers.get("from") or "")
            h.add("To", response.headers.get("to") or "")
            h.add("Call-ID", req.call_id or "")
            h.add("CSeq", f"{number} {method}")
            if method == "BYE":
                h.add("Reason", 'SIP;cause=487;text="Call cancelled"')
            h.add("Content-Length", "0")
            msg = Request(method, uri, h)
            self._add_via(branch.ctx.endpoint, msg, branch.address.transport, req)
            if method == "ACK":
                branch.ctx.endpoint.send_stateless(msg, branch.address)
            else:
                try:
                    branch.ctx.endpoint.send_request(msg, branch.address)
                except (OSError, ValueError) as exc:
                    log.warning("cannot end a cancelled call at %s: %s", branch.address, exc)
        self.stats["ghost_calls_answered"] += 1
        if len(self._ghosts) > 1000:
            self._ghosts.clear()
        self._ghosts.add(branch.txn)

    def _mark_cancel_on_ring(self, branch: _Branch) -> None:
        branch.cancelled = True
        branch.cancel_pending = True
        branch.cancel_reason = 'SIP;cause=487;text="Call cancelled"'

    # ------------------------------------------------------------------ fork-late
    def on_binding_event(self, event: BindingEvent) -> None:
        """A registration: ring it for every held call, deliver held messages to it."""
        if event.kind not in ("added", "refreshed"):
            return
        binding = event.binding
        group = self._by_aor.get(event.aor)
        if group:
            for ctx in list(group):
                self._late_fork(ctx, binding)
        # Held MESSAGEs go out on a registration through this node only: with a shared
        # store, the node that sees the registration delivers (it looks in the store), so
        # a remote event here would deliver them a second time.
        if not event.remote and self.held is not None and self.held.may_have(event.aor):
            self._spawn(self._deliver_held(event.aor, binding))

    def _late_fork(self, ctx: _Context, binding: Binding) -> None:
        key = binding.push_key
        if ctx.done:
            if key is not None and key in ctx.linger and ctx.is_invite:
                ctx.linger.discard(key)
                self.stats["ghost_calls"] += 1
                ghost = self._branch_to(ctx, binding)
                if ghost is not None:
                    ghost.ghost = True
                    self._mark_cancel_on_ring(ghost)
            if key is not None:
                self._stop_pushes(ctx, key)
            return
        if ctx.kind is None or not self.config.router.fork_late or ctx.ringing_only:
            return
        if binding.device in ctx.answered:
            return
        target = self.registrar.target(binding)
        for branch in ctx.branches:
            same_device = branch.device == binding.device or (
                key is not None and branch.push_key == key
            )
            if not same_device or not branch.pending:
                continue
            if branch.contact == binding.contact and branch.address == target.address:
                return  # already ringing there (a plain refresh)
            self._cancel(branch, None)  # the device moved: its old contact is dead
        self._stop_pushes(ctx, key)
        self.stats["late_forks"] += 1
        ctx.devices.setdefault(device_of(binding), binding)
        self._branch_to(ctx, binding)

    # ------------------------------------------------------------------ messages
    def _accept(self, ctx: _Context) -> None:
        """message-accept-timeout: store the MESSAGE durably, then answer 202."""
        ctx.timer = None
        if ctx.done or self.held is None:
            return
        self._spawn(self._hold(ctx))

    def _owed(self, ctx: _Context) -> list[str]:
        """The devices of a MESSAGE's fork that have not answered it."""
        return [
            device
            for device, binding in ctx.devices.items()
            if binding.device not in ctx.answered and device not in ctx.delivered
        ]

    def _message_taken(self, ctx: _Context, branch: _Branch) -> None:
        """A device answered a MESSAGE 2xx: the others still get it (per device)."""
        device = branch.device_id
        ctx.delivered.add(device)
        if self.held is None:
            return
        if ctx.held is not None:
            self._spawn(self._delivered(ctx.aor, ctx.held, device))
            return
        if ctx.holding or ctx.done:
            return  # _hold marks the devices that took it once the MESSAGE is stored
        # Sleeping devices have not had it: hold it for them (fork-late, per device).
        sleeping = [
            d
            for d, b in ctx.devices.items()
            if b.push_key in ctx.sleeping and d not in ctx.delivered
        ]
        if sleeping:
            ctx.holding = True
            self._spawn(self._hold_for(ctx, sleeping))

    async def _hold_for(self, ctx: _Context, devices: list[str]) -> None:
        """Store a MESSAGE answered 2xx by one device for the sleeping others."""
        assert self.held is not None
        try:
            ctx.held = await self.held.hold(ctx.aor, ctx.request, devices, ctx.delivered)
        except StoreError as exc:
            log.error("cannot hold a MESSAGE for the other devices of %s: %s", ctx.aor, exc)
            return
        self.stats["messages_held"] += 1

    async def _hold(self, ctx: _Context) -> None:
        assert self.held is not None
        ctx.holding = True
        try:
            ctx.held = await self.held.hold(
                ctx.aor, ctx.request, self._owed(ctx), set(ctx.delivered)
            )
        except StoreError as exc:
            log.error("cannot hold a MESSAGE for %s: %s", ctx.aor, exc)
            self._finish(ctx, _store_failure(ctx.request, exc, self._tag(ctx)))
            return
        self.stats["messages_held"] += 1
        if ctx.done:  # answered meanwhile by a device: it has it, the others get it later
            for device in set(ctx.delivered):
                await self._delivered(ctx.aor, ctx.held, device)
            return
        ctx.done = True
        self._relay(ctx, self._answer(ctx, 202, "Accepted"))
        for branch in ctx.branches:
            self._cancel(branch, None)
        # Keep the context while pushes are repeated; a registration stops them.
        push = self.config.push
        keep = push.timeout + push.retransmission_count * push.retransmission_interval + 1
        ctx.timer = self.timers.after(keep, lambda: self._forget(ctx))

    async def _delivered(self, aor: str, message_id: str, device: str) -> None:
        assert self.held is not None
        try:
            await self.held.delivered_to(aor, message_id, device)
        except StoreError as exc:
            log.error("cannot record a delivered MESSAGE: %s", exc)

    async def _deliver_held(self, aor: str, binding: Binding) -> None:
        assert self.held is not None
        endpoint = self.endpoint
        if endpoint is None:
            return
        target = self.registrar.target(binding)

        async def send(request: Request) -> int:
            return await self._send_held(endpoint, request, target)

        try:
            count = await self.held.deliver(aor, device_of(binding), send)
        except StoreError as exc:
            log.error("cannot deliver held messages of %s: %s", aor, exc)
            return
        self.stats["messages_delivered"] += count

    def _send_held(self, endpoint: Endpoint, stored: Request, target: Target) -> Awaitable[int]:
        """Send one held MESSAGE to ``target``; the future gives its final status."""
        fwd = self._copy(stored)
        fwd.headers.remove("via")
        self._pop_own_routes(endpoint, fwd)
        fwd.uri = target.request_uri
        mf = fwd.max_forwards
        fwd.headers.set("Max-Forwards", str(mf - 1 if mf is not None else 70))
        if target.route:
            _prepend(fwd.headers, "Route", target.route)
        self._add_via(endpoint, fwd, target.address.transport, stored)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            txn = endpoint.send_request(fwd, target.address)
        except (OSError, ValueError):
            future.set_result(503)
            return future
        if not future.done():
            self._waiters[txn] = future
            self._progress.set()
        return future

    # ------------------------------------------------------------------ helpers
    def _spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("router task failed", exc_info=task.exception())

    @staticmethod
    def _copy(request: Request) -> Request:
        return Request(request.method, request.uri, Headers(list(request.headers)), request.body)

    def _ruri(self, request: Request) -> Address:
        return uri_address(request.uri)

    def _is_me(self, endpoint: Endpoint, uri: SipUri) -> bool:
        host = uri.host.strip("[]").lower()
        for transport in ("UDP", "TCP", "TLS", "WS", "WSS"):
            local = endpoint.transports.local_address(transport)
            if local is None:
                continue
            port = uri.port or DEFAULT_PORTS.get((uri.transport or "udp").upper(), 5060)
            if local[0] == host and local[1] == port:
                return True
        return uri.port is None and host in self.domains

    def _local(self, endpoint: Endpoint, transport: str) -> tuple[str, str, int]:
        for name in (transport.upper(), "UDP", "TCP"):
            local = endpoint.transports.local_address(name)
            if local is not None:
                return name, local[0], local[1]
        return "UDP", "127.0.0.1", 5060

    def _record_route(self, endpoint: Endpoint, transport: str, flow: Address) -> str:
        """Our Record-Route entry for the side of ``flow``; facing a browser (WS, WSS) it
        carries a token naming that flow, since the browser's Contact cannot be reached
        (RFC 7118 §7's example proxies do the same)."""
        name, host, port = self._local(endpoint, transport)
        user = f"{self._flow_token(endpoint, flow)}@" if flow.transport in _WS else ""
        return f"<sip:{user}{bracket(host)}:{port};transport={name.lower()};lr>"

    def _add_via(self, endpoint: Endpoint, fwd: Request, transport: str, original: Request) -> None:
        name, host, port = self._local(endpoint, transport)
        unique = f"{next(self._ids):x}{secrets.token_hex(4)}"
        branch = loop_branch(original, unique, self._branch_key)
        sent_by = f"{bracket(host)}:{port}"
        fwd.headers.insert(0, "Via", f"SIP/2.0/{name} {sent_by};branch={branch};rport")


#: Transports whose peers can only be reached over the connection they opened.
_WS = ("WS", "WSS")
#: User part prefix of our Record-Route entries that name a flow.
_FLOW_PREFIX = "fl"
#: A flow token as :meth:`Router._flow_token` writes it: hex of the flow, then a hex MAC.
_FLOW_TOKEN = re.compile(rf"{_FLOW_PREFIX}((?:[0-9a-f]{{2}})+)([0-9a-f]{{20}})")


def _prepend(headers: Headers, name: str, values: list[str]) -> None:
    """Put ``values`` before the existing ``name`` fields (or at the end when none)."""
    key = name.lower()
    index = len(headers)
    for i, (field, _) in enumerate(headers):
        if field.lower() == key:
            index = i
            break
    for offset, value in enumerate(values):
        headers.insert(index + offset, name, value)


def _store_failure(request: Request, exc: StoreError, to_tag: str | None = None) -> Response:
    """The answer when the store failed: 503 with Retry-After while it is unreachable
    (the sender tries again later), 500 for any other fault."""
    if isinstance(exc, StoreUnavailable):
        response = make_response(request, 503, "Service Unavailable", to_tag=to_tag)
        response.headers.add("Retry-After", str(exc.retry_after))
        return response
    return make_response(request, 500, "Server Internal Error", to_tag=to_tag)


def _via_address(via: Via) -> Address:
    """Where a response goes for this Via (RFC 3261 §18.2.2 with RFC 3581 rport)."""
    transport = (via.transport or "UDP").upper()
    host = via.received or via.host
    rport = via.rport
    port = int(rport) if rport and rport.isdigit() else via.port
    return Address(transport, host, port or DEFAULT_PORTS.get(transport, 5060))


__all__ = ["Router", "parse_status_line"]
