"""Proxy core: sanity checks (RFC 3261 §16.3), domain policy (never an open relay), dispatch."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from sipwake.clock import FakeClock
from sipwake.config import parse_config
from sipwake.proxy.auth import Authenticator
from sipwake.proxy.core import ProxyCore, loop_branch
from sipwake.sip.endpoint import Endpoint, TransactionUser
from sipwake.sip.message import Request, Response, make_response, parse_message
from sipwake.sip.transaction import Address, ServerTransaction, TimerConfig

SOURCE = Address("UDP", "127.0.0.1", 5070)


class FakeEndpoint(Endpoint):
    """A real endpoint without sockets that records what the core answers instead of
    sending it; it listens (on paper) on UDP and TCP at ``local``."""

    def __init__(self, local: tuple[str, int] = ("127.0.0.1", 5060)) -> None:
        super().__init__(TransactionUser())
        self.transports.listening.extend([("UDP", *local), ("TCP", *local)])
        self.sent: list[Response] = []

    def respond(
        self, txn: ServerTransaction, status: int, reason: str | None = None, **kw: str
    ) -> Response:
        assert txn.request is not None
        response = make_response(txn.request, status, reason)
        for name, value in kw.items():
            response.headers.add(name.replace("_", "-"), value)
        self.sent.append(response)
        return response

    def send_response(self, txn: ServerTransaction, response: Response) -> None:
        self.sent.append(response)


def txn_of(request: Request) -> ServerTransaction:
    """The server transaction ``request`` would get from the transaction layer."""
    key = (request.top_via.branch if request.top_via else "", request.method)
    return ServerTransaction(key, request, SOURCE, FakeClock(), TimerConfig())


class Recorder:
    """Stands for the router and the registrar: records what was dispatched to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_request(self, endpoint: Any, txn: Any, request: Request, source: Address) -> None:
        self.calls.append(("request", request.method))

    def on_response(self, *args: Any) -> None:
        self.calls.append(("response", None))

    def on_cancel(self, endpoint: Any, txn: Any, cancel: Request) -> None:
        self.calls.append(("cancel", cancel.method))

    def on_timeout(self, *args: Any) -> None:
        self.calls.append(("timeout", None))

    def on_transport_error(self, *args: Any) -> None:
        self.calls.append(("transport_error", None))

    def on_register(self, endpoint: Any, txn: Any, request: Request, source: Address) -> None:
        self.calls.append(("register", request.method))


def request(
    method: str = "INVITE",
    uri: str = "sip:bob@example.org",
    to: str = "<sip:bob@example.org>",
    frm: str = "<sip:alice@example.org>;tag=1",
    extra: str = "",
    max_forwards: int = 70,
) -> Request:
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport",
        f"Max-Forwards: {max_forwards}",
        f"From: {frm}",
        f"To: {to}",
        "Call-ID: call-1",
        f"CSeq: 1 {method}",
        "Contact: <sip:alice@127.0.0.1:5070>",
    ]
    if extra:
        lines.append(extra)
    lines += ["Content-Length: 0", "", ""]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def make_core(extra: str = "") -> tuple[ProxyCore, Recorder, Recorder]:
    config = parse_config(tomllib.loads('[sip]\ndomains = ["example.org"]\n' + extra))
    router, registrar = Recorder(), Recorder()
    auth = Authenticator(config)
    core = ProxyCore(config, registrar, router, auth)
    return core, router, registrar


def run(core: ProxyCore, req: Request) -> FakeEndpoint:
    ep = FakeEndpoint()
    core.on_request(ep, txn_of(req), req, SOURCE)
    return ep


def status(ep: FakeEndpoint) -> int | None:
    return ep.sent[-1].status if ep.sent else None


def test_request_for_our_domain_goes_to_the_router() -> None:
    core, router, registrar = make_core()
    ep = run(core, request())
    assert ep.sent == [] and router.calls == [("request", "INVITE")]
    run(core, request("REGISTER", "sip:example.org"))
    assert registrar.calls == [("register", "REGISTER")]


def test_foreign_domain_is_403_never_an_open_relay() -> None:
    core, router, registrar = make_core()
    ep = run(core, request(uri="sip:bob@victim.net", to="<sip:bob@victim.net>"))
    assert status(ep) == 403 and "victim.net" in ep.sent[-1].reason
    # A pre-loaded Route to us does not turn a foreign initial request into ours.
    ep = run(core, request(uri="sip:bob@victim.net", extra="Route: <sip:127.0.0.1:5060;lr>"))
    assert status(ep) == 403
    ep = run(core, request("REGISTER", "sip:victim.net"))
    assert status(ep) == 403
    assert router.calls == [] and registrar.calls == []


def test_relaying_only_when_configured() -> None:
    core, router, _ = make_core('[router]\nrelay-domains = ["partner.net"]\n')
    assert status(run(core, request(uri="sip:bob@partner.net"))) is None
    assert status(run(core, request(uri="sip:bob@other.net"))) == 403
    assert router.calls == [("request", "INVITE")]


def test_in_dialog_request_routed_through_us_is_forwarded() -> None:
    core, router, _ = make_core()
    bye = request(
        "BYE",
        "sip:bob@192.0.2.7:5080",
        to="<sip:bob@example.org>;tag=99",
        extra="Route: <sip:127.0.0.1:5060;lr>",
    )
    assert status(run(core, bye)) is None
    assert router.calls == [("request", "BYE")]


@pytest.mark.parametrize(("uri", "code"), [("tel:+15551234", 416), ("mailto:bob@example.org", 416)])
def test_unknown_uri_scheme_is_416(uri: str, code: int) -> None:
    core, router, _ = make_core()
    assert status(run(core, request(uri=uri))) == code
    assert router.calls == []


def test_max_forwards_zero_is_483_and_proxy_require_420() -> None:
    core, router, _ = make_core()
    assert status(run(core, request(max_forwards=0))) == 483
    ep = run(core, request(extra="Proxy-Require: foo, path"))
    assert status(ep) == 420 and ep.sent[-1].headers.get("unsupported") == "foo"
    assert router.calls == []


def test_loop_is_482() -> None:
    core, router, _ = make_core()
    req = request()
    ours = f"SIP/2.0/UDP 127.0.0.1:5060;branch={loop_branch(req, 'x1')}"
    looped = request(extra="")
    looped.headers.insert(0, "Via", looped.headers.get("via") or "")
    looped.headers.set("Via", "SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKother")
    looped.headers.add("Via", ours)
    assert status(run(core, looped)) == 482
    # A spiral (same request after a retargeting) is not a loop.
    spiral = request(uri="sip:bob-mobile@example.org")
    spiral.headers.set("Via", "SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKother")
    spiral.headers.add("Via", ours)
    assert status(run(core, spiral)) is None
    assert router.calls == [("request", "INVITE")]


def test_options_to_the_server_answered_here() -> None:
    core, router, _ = make_core()
    ep = run(core, request("OPTIONS", "sip:127.0.0.1:5060", to="<sip:127.0.0.1>"))
    assert status(ep) == 200 and "REGISTER" in (ep.sent[-1].headers.get("allow") or "")
    run(core, request("OPTIONS", "sip:bob@example.org"))
    assert router.calls == [("request", "OPTIONS")]


def stateless(core: ProxyCore, req: Request) -> Response | None:
    answer = core.answer_stateless(FakeEndpoint(), req, SOURCE)
    if answer is None:
        return None
    msg = parse_message(answer)
    assert isinstance(msg, Response)
    return msg


def test_options_to_the_server_is_answered_statelessly_and_only_that() -> None:
    core, router, _ = make_core()
    ping = request("OPTIONS", "sip:127.0.0.1:5060", to="<sip:127.0.0.1>")
    answer = stateless(core, ping)
    assert answer is not None and answer.status == 200
    assert "REGISTER" in (answer.headers.get("allow") or "")
    assert answer.to is not None and answer.to.tag
    # The same request (a retransmission) gets the same answer, tag included.
    again = stateless(core, request("OPTIONS", "sip:127.0.0.1:5060", to="<sip:127.0.0.1>"))
    assert again is not None and again.to_bytes() == answer.to_bytes()
    # In a dialog: the request's To tag is kept.
    answered = stateless(core, request("OPTIONS", "sip:example.org", to="<sip:example.org>;tag=d1"))
    assert answered is not None and answered.to is not None and answered.to.tag == "d1"
    # For a user, through a Route, for another domain: a server transaction as usual.
    for other in (
        request("OPTIONS", "sip:bob@example.org"),
        request("OPTIONS", "sip:example.org", extra="Route: <sip:10.0.0.1;lr>"),
        request("OPTIONS", "sip:victim.net"),
        request("OPTIONS", "tel:+15551234"),
    ):
        assert stateless(core, other) is None
    assert router.calls == []


@pytest.mark.parametrize(
    "fields",
    [
        "",
        "Via: SIP/2.0/TCP 10.0.0.2:5080;branch=z9hG4bKsecond\r\n",
        "Supported: path,\r\n gruu\r\n",  # folded: the copied fields are as received
    ],
)
@pytest.mark.parametrize(
    "to",
    [
        "<sip:example.org>",
        "sip:example.org",
        "<sip:example.org>;tag=d1",
        "<sip:tagged@example.org>",
    ],
)
def test_the_written_options_answer_is_the_generic_response_byte_for_byte(
    fields: str, to: str
) -> None:
    core, _, _ = make_core()
    data = (
        "OPTIONS sip:example.org SIP/2.0\r\n"
        "v: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKabc;rport=5070;received=127.0.0.1\r\n"
        f"{fields}Max-Forwards: 70\r\nf: <sip:alice@example.org>;tag=1\r\nt: {to}\r\n"
        "i: call-7\r\nCSeq: 3 OPTIONS\r\nl: 0\r\n\r\n"
    ).encode()
    req = parse_message(data)
    assert isinstance(req, Request)
    answer = core.answer_stateless(FakeEndpoint(), req, SOURCE)
    assert answer == core.options_response(req).to_bytes()


def test_cancel_and_transaction_events_go_to_the_router() -> None:
    core, router, _ = make_core()
    run(core, request("CANCEL"))
    ep = FakeEndpoint()
    txn = txn_of(request())
    core.on_timeout(ep, txn)
    core.on_transport_error(ep, txn)
    assert router.calls == [("cancel", "CANCEL"), ("timeout", None), ("transport_error", None)]


def test_auth_enabled_challenges_calls_from_our_users_only() -> None:
    core, router, _ = make_core('[auth]\nenabled = true\nusers = { alice = "pw" }\n')
    ep = run(core, request())
    assert status(ep) == 407 and ep.sent[-1].headers.get("proxy-authenticate")
    # A call from another domain to our user needs no credentials of ours.
    assert status(run(core, request(frm="<sip:carol@remote.net>;tag=5"))) is None
    # In-dialog requests are not challenged.
    bye = request("BYE", to="<sip:bob@example.org>;tag=2")
    assert status(run(core, bye)) is None
    assert router.calls == [("request", "INVITE"), ("request", "BYE")]


def test_loop_through_an_ipv6_listening_point_is_482() -> None:
    core, _, _ = make_core()
    ep = FakeEndpoint(("2001:db8::5", 5060))
    req = request()
    looped = request()
    looped.headers.set("Via", "SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKother")
    looped.headers.add("Via", f"SIP/2.0/UDP [2001:db8::5]:5060;branch={loop_branch(req, 'x1')}")
    core.on_request(ep, txn_of(looped), looped, SOURCE)
    assert status(ep) == 482


def test_core_advertises_the_configured_address() -> None:
    core, _, _ = make_core('advertise = ["sip.example.org", "tls://[2001:db8::1]:5061"]\n')
    assert core.advertised_address("UDP", "0.0.0.0") == ("sip.example.org", None)
    assert core.advertised_address("TLS", "::") == ("2001:db8::1", 5061)
