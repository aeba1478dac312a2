"""The SIP endpoint: transports + transaction layer + a transaction user (TU).

The TU (the registrar and proxy later; :class:`OptionsUser` now) gets server
transactions for new requests and creates client transactions through
:meth:`Endpoint.send_request`. Timers run on the asyncio loop from the transaction
layer's earliest deadline, read on the endpoint's clock.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final

from sipwake.clock import Clock, SystemClock
from sipwake.compiled import mypyc_attr
from sipwake.sip.headers import field_entries
from sipwake.sip.message import Request, Response, make_response
from sipwake.sip.transaction import (
    Action,
    Address,
    ClientTransaction,
    DeliverRequest,
    DeliverResponse,
    Send,
    ServerTransaction,
    State,
    Timeout,
    TimerConfig,
    Transaction,
    TransactionLayer,
    TransportFailure,
)
from sipwake.sip.transport import (
    TransportConfig,
    TransportLayer,
    bracket,
    reconnect_address,
    response_address,
)
from sipwake.sip.uri import AbsoluteUri

log = logging.getLogger("sipwake.sip")

#: Timers are batched to this resolution (seconds): SIP timers need no finer.
TIMER_RESOLUTION = 0.01

# Class-level defaults below are Final constants: mypyc sets only constants as defaults.
_NO_METHODS: Final[frozenset[str]] = frozenset()
_OPTIONS_IMPLEMENTED: Final = frozenset({"OPTIONS", "ACK", "CANCEL"})
#: The settings TransactionUser and OptionsUser declare, which subclasses set in __init__.
_SETTINGS: Final = {
    "TransactionUser": ("stateless_methods",),
    "OptionsUser": ("implemented", "accept", "supported"),
}


def _refuse_class_settings(cls: type) -> None:
    """Refuse a subclass that sets a base's setting in its class body.

    Compiled with mypyc, the base's methods read its own default from the instance, never
    an interpreted subclass's class attribute: such a subclass would behave differently
    compiled and interpreted. Refused in both modes alike; ``__init__`` can set them.
    """
    namespace = vars(cls)
    for base in cls.__mro__[1:]:
        if base.__module__ != __name__:
            continue
        for name in _SETTINGS.get(base.__name__, ()):
            if name in namespace and not hasattr(namespace[name], "__get__"):  # a slot: ok
                raise TypeError(
                    f"{cls.__qualname__}: set {name} in __init__ (self.{name} = ...), "
                    f"not in the class body (the compiled base would not see it)"
                )


@mypyc_attr(allow_interpreted_subclasses=True)
class TransactionUser:
    """What the layer above transactions implements; every hook defaults to nothing.

    Compiled, it still takes interpreted subclasses: a TU is what users of the endpoint
    write (tests, tools); the server's own (:class:`~sipwake.proxy.core.ProxyCore`) is
    compiled and called natively.
    """

    #: Methods :meth:`answer_stateless` is asked about (an empty set: none, no cost).
    stateless_methods: frozenset[str] = _NO_METHODS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_class_settings(cls)

    def answer_stateless(
        self, endpoint: Endpoint, request: Request, source: Address
    ) -> bytes | None:
        """A response (on the wire) to send without a server transaction (RFC 3261 8.2.7).

        Only for requests whose answer has no side effect and is the same for every copy
        (a retransmission is answered again, identically): a keep-alive OPTIONS to the
        server itself. Asked only for ``stateless_methods``; None gives the request a
        server transaction and :meth:`on_request` as usual.
        """
        return None

    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        """A new request (``txn`` is None for an ACK that matched no transaction)."""

    def on_response(
        self,
        endpoint: Endpoint,
        txn: ClientTransaction | None,
        response: Response,
        source: Address,
    ) -> None:
        """A response (``txn`` is None when it matched no client transaction)."""

    def on_timeout(self, endpoint: Endpoint, txn: Transaction) -> None:
        """Timer B/F (no final response), H (no ACK) or a server guard (no answer) fired."""

    def on_transport_error(self, endpoint: Endpoint, txn: Transaction) -> None:
        """The transport could not deliver a transaction's message."""

    def advertised_address(self, transport: str, host: str) -> tuple[str, int | None] | None:
        """The address (host, port or None: the bound one) a new listening point shows in
        Via and Record-Route instead of its bind address; None shows the bind address."""
        return None


@mypyc_attr(allow_interpreted_subclasses=True)
class Endpoint:
    """Runs a TransactionLayer over a TransportLayer for one TU.

    Compiled, it still takes interpreted subclasses (test doubles that record what is
    sent instead of sending it); compiled callers reach a real one natively.
    """

    def __init__(
        self,
        tu: TransactionUser,
        *,
        clock: Clock | None = None,
        timers: TimerConfig | None = None,
        transport_config: TransportConfig | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.tu = tu
        self.clock: Clock = clock or SystemClock()
        self.layer = TransactionLayer(self.clock, timers)
        self.transports = TransportLayer(
            self.on_message, transport_config, self.clock, client_ssl=client_ssl
        )
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    async def listen(
        self,
        transport: str,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        advertise: tuple[str, int | None] | None = None,
    ) -> int:
        """Bind a listening point; returns the bound port (``port`` 0 picks one).

        ``advertise``: the host (and port) our Via and Record-Route show for it; by
        default what the TU's :meth:`TransactionUser.advertised_address` says.
        """
        if advertise is None:
            advertise = self.tu.advertised_address(transport.upper(), host)
        return await self.transports.listen(transport, host, port, ssl_context, advertise)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.transports.close()

    # -- from transports
    def on_message(self, msg: Request | Response, source: Address) -> bytes | None:
        """Hand ``msg`` on; returns a stateless answer for the transport to send back.

        The answer leaves through the socket or connection that received the request
        (RFC 3261 18.2.2), so it goes from the address the peer sent to.
        """
        if isinstance(msg, Request):
            tu = self.tu
            if msg.method in tu.stateless_methods:
                answer = tu.answer_stateless(self, msg, source)
                if answer is not None:
                    return answer
            self.run(self.layer.receive_request(msg, source, response_address(msg, source)))
        else:
            self.run(self.layer.receive_response(msg, source))
        return None

    # -- from the TU
    def send_response(self, txn: ServerTransaction, response: Response) -> None:
        """Answer through the server transaction (which retransmits over UDP)."""
        self.run(self.layer.send_response(txn, response))

    def respond(
        self, txn: ServerTransaction, status: int, reason: str | None = None, **kw: str
    ) -> Response | None:
        """Build, send and return the response ``status`` to ``txn``'s request.

        None when a non-INVITE transaction over UDP already sent its final response (it
        released its request then, and would refuse a second final one anyway).
        """
        request = txn.request
        if request is None:
            return None
        to_tag = kw.pop("to_tag", None)
        fields = field_entries((name.replace("_", "-"), value) for name, value in kw.items())
        response = make_response(request, status, reason, to_tag=to_tag, fields=fields)
        self.send_response(txn, response)
        return response

    def via(self, transport: str) -> str:
        """A Via value for a request sent over ``transport``: our address, a new branch."""
        local = self.transports.local_address(transport)
        if local is None:
            local = self.transports.local_address("UDP") or ("127.0.0.1", 5060)
        host, port = local
        sent_by = f"{bracket(host)}:{port}"
        return f"SIP/2.0/{transport.upper()} {sent_by};branch={self.layer.new_branch()};rport"

    def send_request(self, request: Request, address: Address) -> ClientTransaction:
        """Start a client transaction; its top Via must carry a magic-cookie branch."""
        txn, actions = self.layer.send_request(request, address)
        self.run(actions)
        return txn

    def send_stateless(
        self, message: Request | Response, address: Address, *, connect: bool = True
    ) -> None:
        """Send outside any transaction (ACK for 2xx, forwarded 2xx responses).

        ``connect=False``: only over UDP or an open flow, never a new connection.
        """
        self.transports.send(message.to_bytes(), address, connect=connect)

    # -- actions
    def run(self, actions: Iterable[Action]) -> None:
        """Carry out what the transaction layer asked for.

        Each action is isolated: a failing send or TU callback is logged and the others
        still run, and the timer is re-armed whatever happens (or every transaction's
        timers would stop).
        """
        try:
            for action in actions:
                try:
                    self._carry_out(action)
                except Exception:
                    log.exception(
                        "error carrying out %s (%s)", type(action).__name__, _describe(action)
                    )
        finally:
            self._arm()

    def _carry_out(self, action: Action) -> None:
        tu = self.tu
        if isinstance(action, Send):
            txn = action.transaction
            address = action.address
            transports = self.transports
            if address.transport == "UDP":  # the hot path: a callback only for host names
                on_error = None
                if txn is not None and not transports.is_ip_literal(address.host):
                    on_error = self._error_callback(txn)
                if not transports.send_udp(action.data, address, on_error) and txn:
                    self.run(self.layer.transport_error(txn))
                return
            on_error = None if txn is None else self._error_callback(txn)
            fallback = None
            if isinstance(action.message, Response):
                fallback = reconnect_address(action.message, address)
            transports.send(action.data, address, on_error, fallback)
        elif isinstance(action, DeliverRequest):
            server_txn = action.transaction
            try:
                tu.on_request(self, server_txn, action.request, action.source)
            except Exception:
                self._tu_failed(server_txn)
            if server_txn is not None:
                server_txn.start_guard()  # if the TU answers later: bound the wait
        elif isinstance(action, DeliverResponse):
            tu.on_response(self, action.transaction, action.response, action.source)
        elif isinstance(action, Timeout):
            tu.on_timeout(self, action.transaction)
        elif isinstance(action, TransportFailure):
            tu.on_transport_error(self, action.transaction)

    def _tu_failed(self, txn: ServerTransaction | None) -> None:
        """A TU bug answers 500 rather than leave the transaction waiting forever."""
        log.exception("error handling a request")
        if txn is not None and txn.state in (State.TRYING, State.PROCEEDING):  # no final yet
            self.respond(txn, 500, "Server Internal Error")

    def _error_callback(self, txn: Transaction) -> Callable[[], None]:
        def failed() -> None:
            self.run(self.layer.transport_error(txn))

        return failed

    def _arm(self) -> None:
        """Keep one loop timer at the earliest transaction deadline (cheap when unchanged)."""
        deadline = self.layer.next_deadline()
        if deadline is None:
            return
        armed = self._timer_at
        if armed is not None and armed <= deadline:
            return  # already armed for this deadline or an earlier one
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(deadline - self.clock.monotonic(), 0.0) + TIMER_RESOLUTION
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            actions = self.layer.tick()
        except Exception:
            log.exception("error running transaction timers")
            actions = []
        self.run(actions)


def _describe(action: Action) -> str:
    """A short context for a log line: the transaction's method and Call-ID, or the peer."""
    txn = getattr(action, "transaction", None)
    request = getattr(txn, "request", None)
    if isinstance(request, Request):
        return f"{request.method} Call-ID {request.call_id}"
    address = getattr(action, "address", None)
    return f"to {address}" if address is not None else "no transaction"


# --------------------------------------------------------------------------- minimal TU

#: Methods RFC 3261 and its extensions define; others get 501 from any SIP server.
KNOWN_METHODS = frozenset(
    {
        "ACK",
        "BYE",
        "CANCEL",
        "INFO",
        "INVITE",
        "MESSAGE",
        "NOTIFY",
        "OPTIONS",
        "PRACK",
        "PUBLISH",
        "REFER",
        "REGISTER",
        "SUBSCRIBE",
        "UPDATE",
    }
)


@mypyc_attr(allow_interpreted_subclasses=True)
class OptionsUser(TransactionUser):
    """Answers OPTIONS 200 and everything it does not implement 501 (RFC 3261 21.5.2).

    ``implemented`` are the methods this server handles at all; a method that is
    implemented but not allowed for a Request-URI (see :meth:`allowed_for`) gets 405 with
    Allow (21.4.6). CANCEL and ACK are handled by the transaction layer.
    """

    implemented: frozenset[str] = _OPTIONS_IMPLEMENTED
    accept = "application/sdp"
    supported = ""
    #: ``implemented`` joined for Allow, once (a compiled class has no cached_property).
    _allow_all: str | None = None

    def allowed_for(self, request: Request) -> frozenset[str]:
        """Methods allowed for the request's Request-URI; all implemented ones here."""
        return self.implemented

    def allow_header(self, request: Request) -> str:
        allowed = self.allowed_for(request)
        if allowed is self.implemented:  # the common case, joined once
            joined = self._allow_all
            if joined is None:
                joined = self._allow_all = ", ".join(sorted(allowed))
            return joined
        return ", ".join(sorted(allowed))

    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        if txn is None:
            return  # an ACK for a 2xx we never sent: nothing to do
        method = request.method
        if isinstance(request.parsed_uri, AbsoluteUri) and method != "CANCEL":
            # RFC 3261 8.2.2.1: a scheme we do not understand.
            endpoint.respond(txn, 416)
            return
        if method == "CANCEL":
            self.on_cancel(endpoint, txn, request)
            return
        if method not in self.implemented:
            endpoint.respond(txn, 501)
            return
        if method not in self.allowed_for(request):
            endpoint.respond(txn, 405, Allow=self.allow_header(request))
            return
        if method == "OPTIONS":
            endpoint.respond(
                txn,
                200,
                Allow=self.allow_header(request),
                Accept=self.accept,
                Supported=self.supported,
            )

    def on_cancel(self, endpoint: Endpoint, txn: ServerTransaction, cancel: Request) -> None:
        """CANCEL (RFC 3261 9.2): 200 and 487 to the INVITE if it is pending, else 481."""
        target = endpoint.layer.find_cancel_target(cancel, txn.source.transport)
        if target is None:
            endpoint.respond(txn, 481)
            return
        endpoint.respond(txn, 200)
        if target.last_response is None or target.last_response.status < 200:
            target.cancelled = True
            endpoint.respond(target, 487)
