"""Router: stray responses are forwarded only when they answer a request we forwarded.

A stray 2xx (RFC 3261 §16.11) is forwarded statelessly to the second Via. Anyone can
write a response whose top Via looks like ours, so the branch carries a MAC keyed with a
secret of this process, and such a forward never opens a connection.
"""

from __future__ import annotations

from sipwake.proxy.core import branch_is_ours, loop_branch
from sipwake.sip.message import Request, Response, parse_message
from sipwake.sip.transaction import Address

from .router_helpers import CALLER, Harness, contact, request


def ok_with_vias(*vias: str) -> Response:
    text = (
        "SIP/2.0 200 OK\r\n"
        + "".join(f"Via: {via}\r\n" for via in vias)
        + "From: <sip:alice@example.org>;tag=a\r\n"
        "To: <sip:bob@example.org>;tag=b\r\n"
        "Call-ID: forged@x\r\n"
        "CSeq: 1 INVITE\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Response)
    return msg


async def test_forged_stray_2xx_is_not_reflected(h: Harness) -> None:
    # A branch with our prefix and a plausible loop hash, but not made by this router.
    forged = ok_with_vias(
        "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKlp0123456789ab.1",
        "SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKvictim",
    )
    h.router.on_response(h.endpoint, None, forged, Address("UDP", "198.51.100.1", 5060))  # type: ignore[arg-type]
    forged_tcp = ok_with_vias(
        "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKlp0123456789ab.1.0123456789abcdef0123",
        "SIP/2.0/TCP 203.0.113.5:80;branch=z9hG4bKvictim",
    )
    h.router.on_response(h.endpoint, None, forged_tcp, Address("UDP", "198.51.100.1", 5060))  # type: ignore[arg-type]
    assert h.wire.sent == []


async def test_genuine_stray_2xx_is_forwarded_without_opening_a_connection(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    assert branch_is_ours(branch.top_via.branch if branch.top_via else None, h.router._branch_key)
    h.endpoint.answer(branch, 200)
    # The client transaction is gone: the retransmitted 2xx matches none (txn None).
    stray = ok_with_vias(*branch.headers.get_values("via"))
    before = len(h.wire.sent)
    h.router.on_response(h.endpoint, None, stray, Address("UDP", "127.0.0.1", 6001))  # type: ignore[arg-type]
    ((forwarded, address),) = h.wire.sent[before:]
    assert isinstance(forwarded, Response) and forwarded.status == 200
    assert address == CALLER
    assert h.endpoint.stateless_connect[-1] is False


def test_branch_mac_depends_on_the_key_and_on_every_part() -> None:
    req = request("INVITE")
    key = b"k" * 32
    branch = loop_branch(req, "1a2b", key)
    assert branch_is_ours(branch, key)
    assert not branch_is_ours(branch, b"x" * 32)
    assert not branch_is_ours(branch.replace(".1a2b.", ".1a2c."), key)
    assert not branch_is_ours(loop_branch(req, "1a2b"), key)  # no MAC at all
    assert not branch_is_ours(None, key)


async def test_forwarded_branches_are_not_a_guessable_counter(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    await h.register(contact(6002, user="carol"), 6002, user="carol")
    h.endpoint.receive(request("MESSAGE"))
    h.endpoint.receive(request("MESSAGE", to="sip:carol@example.org"))
    await h.settle()
    suffixes = [
        (m.top_via.branch or "").split(".")[1] for m, _ in h.wire.requests("MESSAGE") if m.top_via
    ]
    assert len(suffixes) == 2
    # The counter part alone ("1", "2") would let a peer predict the next branch.
    assert all(len(s) > 8 for s in suffixes)


async def test_stateless_ack_gets_max_forwards_and_is_dropped_at_zero(h: Harness) -> None:
    def ack(extra_mf: str | None) -> Request:
        req = request("ACK", to="sip:bob@127.0.0.1:6001", to_tag="callee")
        req.headers.remove("max-forwards")
        if extra_mf is not None:
            req.headers.add("Max-Forwards", extra_mf)
        return req

    h.router.on_request(h.endpoint, None, ack(None), CALLER)  # type: ignore[arg-type]
    ((fwd, _),) = h.wire.requests("ACK")
    assert fwd.headers.get("max-forwards") == "70"  # RFC 3261 §16.6 step 3
    h.router.on_request(h.endpoint, None, ack("0"), CALLER)  # type: ignore[arg-type]
    assert len(h.wire.requests("ACK")) == 1  # Max-Forwards 0: dropped, never answered
