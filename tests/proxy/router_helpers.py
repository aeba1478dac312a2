"""A sans-socket harness for the router: real transactions, registrar and store, fake wire."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from typing import Any

from sipwake.clock import FakeClock
from sipwake.config import Config, parse_config
from sipwake.proxy.registrar import Registrar
from sipwake.proxy.router import Router
from sipwake.push.request import Destination, Outcome, PushRequest, PushResult
from sipwake.push.service import PushService
from sipwake.sip.endpoint import Endpoint, TransactionUser
from sipwake.sip.message import Request, Response, make_response, parse_message
from sipwake.sip.transaction import (
    Address,
    ClientTransaction,
    DeliverRequest,
    Send,
    ServerTransaction,
)
from sipwake.store import Store

DOMAIN = "example.org"
PROXY = ("127.0.0.1", 5060)
CALLER = Address("UDP", "127.0.0.1", 7000)
VOIP = (
    "pn-provider=apns.dev;pn-param=ABCD123456.org.example.app.voip%26remote;"
    "pn-prid={voip}:voip%26{remote}:remote"
)
REMOTE_ONLY = "pn-provider=apns.dev;pn-param=ABCD123456.org.example.app;pn-prid={remote}"
ANDROID = "pn-provider=fcm;pn-param=my-project;pn-prid={token}"

_n = itertools.count(1)


def make_config(extra: str = "") -> Config:
    text = (
        f'[sip]\ndomains = ["{DOMAIN}"]\n[registrar]\nmin-expires = 1\n'
        "[router]\ncall-fork-timeout = 30\nmessage-accept-timeout = 2\n"
        "[push]\ntimeout = 0\n"
    )
    # Later keys of the same section override: merge section by section.
    merged: dict[str, Any] = tomllib.loads(text)
    for section, values in tomllib.loads(extra).items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
    return parse_config(merged)


class Recorder:
    """A push provider that records pushes and rejects chosen tokens."""

    name = "recorder"

    def __init__(self) -> None:
        self.pushes: list[PushRequest] = []
        self.reject: set[str] = set()

    def accepts(self, destination: Destination) -> bool:
        return True

    async def send(self, request: PushRequest) -> PushResult:
        self.pushes.append(request)
        if request.destination.token in self.reject:
            return PushResult(Outcome.TOKEN_REJECTED, "Unregistered", status=410)
        return PushResult(Outcome.SENT)

    async def aclose(self) -> None:
        pass


@dataclass
class Wire:
    """What the proxy put on the wire, in order."""

    sent: list[tuple[Request | Response, Address]] = field(default_factory=list)

    def requests(self, method: str | None = None) -> list[tuple[Request, Address]]:
        return [
            (m, a)
            for m, a in self.sent
            if isinstance(m, Request) and (method is None or m.method == method)
        ]

    def responses(self, to: Address = CALLER) -> list[Response]:
        return [m for m, a in self.sent if isinstance(m, Response) and a == to]

    def statuses(self, to: Address = CALLER) -> list[int]:
        return [r.status for r in self.responses(to)]


class FakeEndpoint(Endpoint):
    """A real :class:`~sipwake.sip.endpoint.Endpoint` without sockets: what the router
    sends goes on :attr:`wire`. It listens (on paper) on UDP and TCP at PROXY."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(TransactionUser(), clock=clock)
        self.transports.listening.extend([("UDP", *PROXY), ("TCP", *PROXY)])
        self.wire = Wire()
        self.router: Router | None = None
        #: ``connect`` of each stateless send (False: only over an existing flow).
        self.stateless_connect: list[bool] = []

    def _record(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.wire.sent.append((action.message, action.address))

    def send_request(self, request: Request, address: Address) -> ClientTransaction:
        txn, actions = self.layer.send_request(request, address)
        self._record(actions)
        return txn

    def send_response(self, txn: ServerTransaction, response: Response) -> None:
        self._record(self.layer.send_response(txn, response))

    def respond(
        self, txn: ServerTransaction, status: int, reason: str | None = None, **kw: str
    ) -> Response:
        response = make_response(txn.request, status, reason)
        for name, value in kw.items():
            response.headers.add(name.replace("_", "-"), value)
        self.send_response(txn, response)
        return response

    def send_stateless(
        self, message: Request | Response, address: Address, *, connect: bool = True
    ) -> None:
        self.stateless_connect.append(connect)
        self.wire.sent.append((message, address))

    # -- the network side
    def receive(self, request: Request, source: Address = CALLER) -> ServerTransaction | None:
        """A request from the network: through the transaction layer to the router."""
        assert self.router is not None
        actions = self.layer.receive_request(request, source)
        self._record(actions)
        for action in actions:
            if isinstance(action, DeliverRequest):
                if request.method == "CANCEL" and action.transaction is not None:
                    self.router.on_cancel(self, action.transaction, request)
                else:
                    self.router.on_request(self, action.transaction, request, source)
                return action.transaction
        return None

    def answer(self, request: Request, status: int, tag: str = "callee", **headers: str) -> None:
        """A device answers a request the proxy sent it."""
        assert self.router is not None
        response = make_response(request, status, to_tag=tag if status > 100 else None)
        for name, value in headers.items():
            response.headers.add(name.replace("_", "-"), value)
        response = parse_message(response.to_bytes())  # as it would arrive
        assert isinstance(response, Response)
        txn = self.layer.client.get(
            (response.top_via.branch if response.top_via else "", request.method)
        )
        self.router.on_response(self, txn, response, Address("UDP", "127.0.0.1", 1))

    def on_timeout_of(self, request: Request) -> None:
        """The client transaction of a request the proxy sent timed out (Timer B/F)."""
        assert self.router is not None
        branch = request.top_via.branch if request.top_via else ""
        txn = self.layer.client[(branch, request.method)]
        self.router.on_timeout(self, txn)


def request(
    method: str = "INVITE",
    to: str = f"sip:bob@{DOMAIN}",
    call_id: str | None = None,
    extra: str = "",
    body: str = "",
    to_tag: str | None = None,
) -> Request:
    n = next(_n)
    call_id = call_id or f"call-{n}"
    lines = [
        f"{method} {to} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:7000;branch=z9hG4bKcaller{n};rport",
        "Max-Forwards: 70",
        f'From: "Alice" <sip:alice@{DOMAIN}>;tag=a{n}',
        f"To: <{to}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        "Contact: <sip:alice@127.0.0.1:7000>",
    ]
    if extra:
        lines.append(extra)
    lines += [f"Content-Length: {len(body.encode())}", "", body]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def register(
    contact: str, user: str = "bob", port: int = 6000, call_id: str | None = None
) -> tuple[Request, Address]:
    n = next(_n)
    lines = [
        f"REGISTER sip:{DOMAIN} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKreg{n};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{DOMAIN}>;tag=r{n}",
        f"To: <sip:{user}@{DOMAIN}>",
        f"Call-ID: {call_id or f'reg-{port}-{n}'}",
        f"CSeq: {n} REGISTER",
        f"Contact: {contact}",
        "Expires: 3600",
        "Content-Length: 0",
        "",
        "",
    ]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg, Address("UDP", "127.0.0.1", port)


@dataclass
class Harness:
    clock: FakeClock
    config: Config
    store: Store
    registrar: Registrar
    router: Router
    endpoint: FakeEndpoint
    recorder: Recorder

    @property
    def wire(self) -> Wire:
        return self.endpoint.wire

    async def register(self, contact: str, port: int, user: str = "bob") -> Response:
        req, source = register(contact, user, port)
        response = await self.registrar.handle_register(req, source)
        assert response.status == 200, response.reason
        await self.router.drain()
        return response

    async def settle(self) -> None:
        """Fire due timers and let the work they start finish."""
        for _ in range(10):
            await self.router.drain()
            if not self.router.tick():
                await self.router.drain()
                return

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.settle()


def make_harness(store: Store, extra: str = "", clock: FakeClock | None = None) -> Harness:
    clock = clock or FakeClock()
    config = make_config(extra)
    recorder = Recorder()
    push = PushService([recorder], clock=clock)
    registrar = Registrar(config, store, clock=clock, push=push)
    router = Router(config, registrar, push=push, clock=clock)
    endpoint = FakeEndpoint(clock)
    endpoint.router = router
    router.attach(endpoint)
    return Harness(clock, config, store, registrar, router, endpoint, recorder)


def contact(port: int, params: str = "", user: str = "bob", instance: str | None = None) -> str:
    uri = f"sip:{user}@127.0.0.1:{port}" + (f";{params}" if params else "")
    text = f"<{uri}>"
    if instance:
        text += f';+sip.instance="<urn:uuid:{instance}>"'
    return text
