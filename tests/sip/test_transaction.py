"""Transactions (RFC 3261 section 17) driven with a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import gc

import pytest

from sipwake.clock import FakeClock
from sipwake.sip.message import Request, Response, make_response, parse_message
from sipwake.sip.transaction import (
    Action,
    Address,
    DeliverRequest,
    DeliverResponse,
    Send,
    State,
    Terminated,
    Timeout,
    TimerConfig,
    TransactionLayer,
    TransportFailure,
)

UDP = Address("UDP", "127.0.0.1", 5070)
TCP = Address("TCP", "127.0.0.1", 5070)
T1, T2, T4 = 0.5, 4.0, 5.0


def request(
    method: str = "OPTIONS",
    branch: str = "z9hG4bK-1",
    transport: str = "UDP",
    cseq: int = 1,
    to_tag: str | None = None,
    uri: str = "sip:bob@example.com",
) -> Request:
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    branch_param = f";branch={branch}" if branch else ""
    text = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5070{branch_param}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        f"To: {to}\r\n"
        "Call-ID: call-1@example.com\r\n"
        f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    if method == "ACK":
        text = text.replace(f"CSeq: {cseq} INVITE", f"CSeq: {cseq} ACK")
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def response_to(req: Request, status: int, to_tag: str | None = "b1") -> Response:
    return make_response(req, status, to_tag=to_tag if status > 100 else None)


def sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def layer(clock: FakeClock) -> TransactionLayer:
    return TransactionLayer(clock, TimerConfig(t1=T1, t2=T2, t4=T4))


def advance_to(clock: FakeClock, layer: TransactionLayer, deadline: float) -> list[Action]:
    clock.advance(max(deadline - clock.monotonic(), 0.0))
    return layer.tick()


def retransmit_gaps(clock: FakeClock, layer: TransactionLayer, until: float) -> list[float]:
    """Step from deadline to deadline and record the time between retransmissions."""
    last = clock.monotonic()
    gaps: list[float] = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        actions = advance_to(clock, layer, deadline)
        if sends(actions):
            gaps.append(round(clock.monotonic() - last, 6))
            last = clock.monotonic()
    return gaps


# --------------------------------------------------------------------------- client INVITE


def test_timer_a_doubles_without_cap_and_timer_b_times_out(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE")
    txn, actions = layer.send_request(req, UDP)
    assert sends(actions)[0].data == req.to_bytes()
    assert txn.timers["A"] - clock.monotonic() == T1
    start = clock.monotonic()
    assert txn.timers["B"] - start == 64 * T1
    gaps = retransmit_gaps(clock, layer, start + 64 * T1 - 0.001)
    # INVITE retransmissions double without the T2 cap: 0.5, 1, 2, 4, 8, 16 (sum 31.5).
    assert gaps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    actions = advance_to(clock, layer, start + 64 * T1)
    assert kinds(actions) == ["Timeout", "Terminated"]
    assert txn.state is State.TERMINATED
    assert len(layer) == 0


def test_invite_over_tcp_is_not_retransmitted(clock: FakeClock, layer: TransactionLayer) -> None:
    txn, _ = layer.send_request(request("INVITE", transport="TCP"), TCP)
    assert "A" not in txn.timers
    assert txn.timers["B"] - clock.monotonic() == 64 * T1


def test_provisional_stops_retransmissions(clock: FakeClock, layer: TransactionLayer) -> None:
    req = request("INVITE")
    txn, _ = layer.send_request(req, UDP)
    actions = layer.receive_response(response_to(req, 180), UDP)
    assert [type(a) for a in actions] == [DeliverResponse]
    assert txn.state is State.PROCEEDING
    assert txn.timers == {}
    clock.advance(100)
    assert layer.tick() == []


def test_non_2xx_is_acked_and_timer_d_is_32s_over_udp(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE")
    txn, _ = layer.send_request(req, UDP)
    resp = response_to(req, 486)
    actions = layer.receive_response(resp, UDP)
    ack = sends(actions)[0].message
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert ack.uri == req.uri
    assert ack.cseq.number == 1 and ack.cseq.method == "ACK"
    assert ack.top_via.branch == "z9hG4bK-1"
    assert ack.to.tag == "b1"
    assert ack.call_id == req.call_id
    assert [type(a) for a in actions if not isinstance(a, Send)] == [DeliverResponse]
    assert txn.state is State.COMPLETED
    assert txn.timers["D"] - clock.monotonic() == 32.0
    # A retransmitted 486 is absorbed and re-ACKed, not passed up again.
    again = layer.receive_response(response_to(req, 486), UDP)
    assert kinds(again) == ["Send"]
    assert sends(again)[0].message.method == "ACK"  # type: ignore[union-attr]
    assert kinds(advance_to(clock, layer, txn.timers["D"])) == ["Terminated"]


def test_timer_d_is_zero_over_tcp(layer: TransactionLayer) -> None:
    req = request("INVITE", transport="TCP")
    txn, _ = layer.send_request(req, TCP)
    actions = layer.receive_response(response_to(req, 603), TCP)
    assert kinds(actions) == ["Send", "DeliverResponse", "Terminated"]
    assert txn.state is State.TERMINATED


def test_2xx_retransmissions_reach_the_tu_until_timer_m(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE")
    txn, _ = layer.send_request(req, UDP)
    assert kinds(layer.receive_response(response_to(req, 200), UDP)) == ["DeliverResponse"]
    assert txn.state is State.ACCEPTED
    # No ACK from the transaction for a 2xx: the TU sends it end to end.
    assert kinds(layer.receive_response(response_to(req, 200), UDP)) == ["DeliverResponse"]
    assert kinds(advance_to(clock, layer, clock.monotonic() + 64 * T1)) == ["Terminated"]


def test_transport_error_ends_client_transaction(layer: TransactionLayer) -> None:
    txn, _ = layer.send_request(request("INVITE"), UDP)
    actions = layer.transport_error(txn)
    assert [type(a) for a in actions] == [TransportFailure, Terminated]
    assert len(layer) == 0


# --------------------------------------------------------------------------- client non-INVITE


def test_timer_e_doubles_up_to_t2_and_timer_f_times_out(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    txn, _ = layer.send_request(request("OPTIONS"), UDP)
    start = clock.monotonic()
    assert txn.timers["E"] - start == T1
    assert txn.timers["F"] - start == 64 * T1
    gaps = retransmit_gaps(clock, layer, start + 64 * T1 - 0.001)
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert set(gaps[3:]) == {T2}
    assert kinds(advance_to(clock, layer, start + 64 * T1)) == ["Timeout", "Terminated"]


def test_timer_e_is_t2_once_proceeding(clock: FakeClock, layer: TransactionLayer) -> None:
    req = request("MESSAGE")
    txn, _ = layer.send_request(req, UDP)
    layer.receive_response(response_to(req, 100), UDP)
    assert txn.state is State.PROCEEDING
    advance_to(clock, layer, txn.timers["E"])
    assert txn.timers["E"] - clock.monotonic() == T2


def test_timer_k_is_t4_over_udp_and_zero_over_tcp(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("REGISTER")
    txn, _ = layer.send_request(req, UDP)
    assert kinds(layer.receive_response(response_to(req, 200), UDP)) == ["DeliverResponse"]
    assert txn.timers == {"K": clock.monotonic() + T4}
    # A retransmitted final response in Completed is absorbed.
    assert layer.receive_response(response_to(req, 200), UDP) == []
    assert kinds(advance_to(clock, layer, txn.timers["K"])) == ["Terminated"]

    req2 = request("REGISTER", branch="z9hG4bK-2", transport="TCP", cseq=2)
    txn2, _ = layer.send_request(req2, TCP)
    assert "E" not in txn2.timers
    actions = layer.receive_response(response_to(req2, 200), TCP)
    assert kinds(actions) == ["DeliverResponse", "Terminated"]


def test_response_matches_by_branch_and_cseq_method(layer: TransactionLayer) -> None:
    req = request("INVITE")
    layer.send_request(req, UDP)
    cancel = request("CANCEL")  # same branch, as RFC 3261 9.1 requires
    ctxn, _ = layer.send_request(cancel, UDP)
    actions = layer.receive_response(response_to(cancel, 200), UDP)
    assert actions[0].transaction is ctxn  # type: ignore[union-attr]
    stray = response_to(request("INVITE", branch="z9hG4bK-other"), 200)
    assert kinds(layer.receive_response(stray, UDP)) == ["DeliverResponse"]
    assert layer.receive_response(stray, UDP)[0].transaction is None  # type: ignore[union-attr]


# --------------------------------------------------------------------------- server INVITE


def test_server_invite_sends_100_and_absorbs_retransmissions(
    layer: TransactionLayer,
) -> None:
    req = request("INVITE")
    actions = layer.receive_request(req, UDP)
    # 100 Trying leaves before the TU can answer, so it never overtakes a final response.
    assert kinds(actions) == ["Send", "DeliverRequest"]
    trying = sends(actions)[0].message
    assert isinstance(trying, Response) and trying.status == 100
    again = layer.receive_request(request("INVITE"), UDP)
    assert kinds(again) == ["Send"]  # the last provisional again; the TU is not bothered
    assert sends(again)[0].data == sends(actions)[0].data


def test_timer_g_doubles_to_t2_timer_h_and_ack_timer_i(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    start = clock.monotonic()
    final = layer.send_response(txn, response_to(req, 486))
    assert kinds(final) == ["Send"]
    assert txn.state is State.COMPLETED
    assert txn.timers["G"] - start == T1
    assert txn.timers["H"] - start == 64 * T1
    gaps = retransmit_gaps(clock, layer, start + 12)
    assert gaps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert set(gaps[3:]) == {T2}
    # The request retransmitted in Completed gets the final response again.
    assert sends(layer.receive_request(request("INVITE"), UDP))[0].data == sends(final)[0].data
    ack = request("ACK", to_tag="b1")
    assert layer.receive_request(ack, UDP) == []
    assert txn.state is State.CONFIRMED
    assert set(txn.timers) == {"I"}
    assert txn.timers["I"] - clock.monotonic() == T4
    assert layer.receive_request(request("ACK", to_tag="b1"), UDP) == []  # absorbed
    assert kinds(advance_to(clock, layer, txn.timers["I"])) == ["Terminated"]


def test_timer_h_fires_when_no_ack_comes(clock: FakeClock, layer: TransactionLayer) -> None:
    req = request("INVITE")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    layer.send_response(txn, response_to(req, 404))
    actions = advance_to(clock, layer, clock.monotonic() + 64 * T1)
    assert [type(a) for a in actions][-2:] == [Timeout, Terminated]


def test_server_invite_over_tcp_timer_i_zero_and_no_g(layer: TransactionLayer) -> None:
    req = request("INVITE", transport="TCP")
    txn = layer.receive_request(req, TCP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    layer.send_response(txn, response_to(req, 480))
    assert set(txn.timers) == {"H"}
    assert kinds(layer.receive_request(request("ACK", transport="TCP", to_tag="b1"), TCP)) == [
        "Terminated"
    ]


def test_server_invite_2xx_absorbs_retransmitted_invite(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    layer.send_response(txn, response_to(req, 200))
    assert txn.state is State.ACCEPTED
    assert layer.receive_request(request("INVITE"), UDP) == []
    assert kinds(advance_to(clock, layer, clock.monotonic() + 64 * T1)) == ["Terminated"]


def test_ack_for_2xx_with_new_branch_goes_to_the_tu(layer: TransactionLayer) -> None:
    actions = layer.receive_request(request("ACK", branch="z9hG4bK-ack", to_tag="b1"), UDP)
    assert [type(a) for a in actions] == [DeliverRequest]
    assert actions[0].transaction is None  # type: ignore[union-attr]


# --------------------------------------------------------------------------- server non-INVITE


def test_many_completed_transactions_end_one_by_one_at_their_timer_j(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    """Timer J of thousands of transactions, interleaved with other timers (an INVITE's G
    and H): each ends at its own deadline, in order, and the layer forgets it then."""
    done = []
    for n in range(200):
        req = request("OPTIONS", branch=f"z9hG4bK-many{n}")
        txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
        assert txn is not None
        layer.send_response(txn, response_to(req, 200))
        done.append(txn)
        if n == 100:  # an INVITE answered 486: Timer G retransmits, H gives up
            invite = request("INVITE", branch="z9hG4bK-inv")
            server = layer.receive_request(invite, UDP)[1].transaction  # type: ignore[union-attr]
            assert server is not None
            layer.send_response(server, response_to(invite, 486))
        clock.advance(0.05)
    assert len(layer) == 201
    due = {id(t): t.timers["J"] for t in done}
    ended = []
    retransmitted = 0
    while (deadline := layer.next_deadline()) is not None:
        for action in advance_to(clock, layer, deadline):
            if isinstance(action, Terminated):
                ended.append(action.transaction)
                if id(action.transaction) in due:  # not earlier, not later
                    assert clock.monotonic() == due[id(action.transaction)]
            retransmitted += isinstance(action, Send)
    assert [t for t in ended if t in done] == done  # in the order they completed
    assert server in ended and retransmitted > 0
    assert len(layer) == 0


def test_server_non_invite_timer_j(clock: FakeClock, layer: TransactionLayer) -> None:
    req = request("OPTIONS")
    actions = layer.receive_request(req, UDP)
    assert kinds(actions) == ["DeliverRequest"]
    txn = actions[0].transaction  # type: ignore[union-attr]
    assert txn is not None and txn.state is State.TRYING
    assert layer.receive_request(request("OPTIONS"), UDP) == []  # absorbed in Trying
    layer.send_response(txn, response_to(req, 100))
    assert kinds(layer.receive_request(request("OPTIONS"), UDP)) == ["Send"]  # last 1xx
    ok = layer.send_response(txn, response_to(req, 200))
    assert txn.timers["J"] - clock.monotonic() == 64 * T1
    # While it waits for Timer J it keeps the response's bytes, not the objects.
    assert txn.last_response is None and txn.request is None
    again = layer.receive_request(request("OPTIONS"), UDP)
    assert sends(again)[0].data == sends(ok)[0].data
    # A second final response from the TU is refused.
    assert layer.send_response(txn, response_to(req, 500)) == []
    assert kinds(advance_to(clock, layer, txn.timers["J"])) == ["Terminated"]
    # After J the same request is a new transaction again.
    assert kinds(layer.receive_request(request("OPTIONS"), UDP)) == ["DeliverRequest"]


def test_completed_non_invite_over_udp_absorbs_retransmissions_until_timer_j(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    """A REGISTER retransmitted after our final response gets the very same bytes again
    and never reaches the TU, for the 32 s of Timer J; after it, it is a new request."""
    req = request("REGISTER")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    final = sends(layer.send_response(txn, response_to(req, 200)))[0]
    deadline = txn.timers["J"]
    for at in (1.0, 64 * T1 - 0.01):
        clock.advance(max(deadline - 64 * T1 + at - clock.monotonic(), 0.0))
        assert layer.tick() == []
        again = layer.receive_request(request("REGISTER"), UDP)
        assert kinds(again) == ["Send"]
        assert sends(again)[0].data == final.data and sends(again)[0].address == UDP
    assert len(layer) == 1
    assert kinds(advance_to(clock, layer, deadline)) == ["Terminated"]
    assert len(layer) == 0
    after = layer.receive_request(request("REGISTER"), UDP)
    assert kinds(after) == ["DeliverRequest"] and after[0].transaction is not txn  # type: ignore[union-attr]


def test_completed_non_invite_keeps_nothing_the_garbage_collector_tracks(
    layer: TransactionLayer,
) -> None:
    """While Timer J runs, a completed transaction holds no GC-tracked object of its own:
    only objects every transaction shares (its class, the clock, the layer's timer
    callback, the source's address). A server with a million phones keeps hundreds of
    thousands of these alive, and every collection walks what they hold."""
    done = []
    for n in range(2):
        req = request("REGISTER", branch=f"z9hG4bK-gc{n}")
        txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
        assert txn is not None
        layer.send_response(txn, response_to(req, 200))
        done.append(txn)
    gc.collect()  # tuples of strings and numbers (the key) are untracked at a first pass
    first, second = ({id(r): r for r in gc.get_referents(t) if gc.is_tracked(r)} for t in done)
    assert first.keys() == second.keys()  # all shared, nothing per transaction
    assert all(not gc.is_tracked(r) for r in gc.get_referents(done[0].timers))
    assert not gc.is_tracked(done[0].key) and not gc.is_tracked(done[0].timers)
    assert layer.server[done[0].key] is done[0]


def test_completed_rfc2543_non_invite_still_matches_by_to_tag(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    """Without the magic cookie the To tag is part of the match: it is kept when the
    request is released, so a retransmission is still absorbed and another request is not."""
    req = request("OPTIONS", branch="", to_tag="x1")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    final = sends(layer.send_response(txn, response_to(req, 200)))[0]
    assert txn.request is None
    assert (
        sends(layer.receive_request(request("OPTIONS", branch="", to_tag="x1"), UDP))[0].data
        == final.data
    )
    other = layer.receive_request(request("OPTIONS", branch="", to_tag="x2"), UDP)
    assert kinds(other) == ["DeliverRequest"]


def test_server_non_invite_over_tcp_ends_at_final(layer: TransactionLayer) -> None:
    req = request("OPTIONS", transport="TCP")
    txn = layer.receive_request(req, TCP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    assert kinds(layer.send_response(txn, response_to(req, 200))) == ["Send", "Terminated"]
    assert len(layer) == 0


def test_server_transport_error(layer: TransactionLayer) -> None:
    req = request("OPTIONS")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    assert kinds(layer.transport_error(txn)) == ["TransportFailure", "Terminated"]
    assert len(layer) == 0


def test_reply_to_is_where_responses_go(layer: TransactionLayer) -> None:
    nat = Address("UDP", "203.0.113.9", 40000)
    actions = layer.receive_request(request("INVITE"), UDP, reply_to=nat)
    assert sends(actions)[0].address == nat


# --------------------------------------------------------------------------- matching


def test_different_sent_by_or_method_is_a_different_transaction(layer: TransactionLayer) -> None:
    layer.receive_request(request("OPTIONS"), UDP)
    other = request("OPTIONS")
    other.headers.set("Via", "SIP/2.0/UDP 10.0.0.2:5070;branch=z9hG4bK-1")
    assert kinds(layer.receive_request(other, UDP)) == ["DeliverRequest"]
    assert kinds(layer.receive_request(request("MESSAGE"), UDP)) == ["DeliverRequest"]
    assert len(layer) == 3


def test_cancel_finds_its_invite(layer: TransactionLayer) -> None:
    invite_txn = layer.receive_request(request("INVITE"), UDP)[0].transaction  # type: ignore[union-attr]
    cancel = request("CANCEL")
    actions = layer.receive_request(cancel, UDP)
    assert kinds(actions) == ["DeliverRequest"]  # CANCEL is its own transaction
    assert actions[0].transaction is not invite_txn  # type: ignore[union-attr]
    assert layer.find_cancel_target(cancel, "UDP") is invite_txn
    assert layer.find_cancel_target(request("CANCEL", branch="z9hG4bK-x"), "UDP") is None


def test_rfc2543_requests_without_magic_cookie_match(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("INVITE", branch="")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    assert kinds(layer.receive_request(request("INVITE", branch=""), UDP)) == ["Send"]
    layer.send_response(txn, response_to(req, 486, to_tag="srv"))
    # An ACK with the To tag of our response matches; one with another tag does not.
    assert kinds(layer.receive_request(request("ACK", branch="", to_tag="other"), UDP)) == [
        "DeliverRequest"
    ]
    assert layer.receive_request(request("ACK", branch="", to_tag="srv"), UDP) == []
    assert txn.state is State.CONFIRMED
    assert layer.find_cancel_target(request("CANCEL", branch=""), "UDP") is txn
    # A different CSeq is another transaction.
    assert "DeliverRequest" in kinds(
        layer.receive_request(request("INVITE", branch="", cseq=2), UDP)
    )


def test_new_branches_are_unique_and_carry_the_cookie(layer: TransactionLayer) -> None:
    branches = {layer.new_branch() for _ in range(100)}
    assert len(branches) == 100
    assert all(b.startswith("z9hG4bK") for b in branches)


def test_unanswered_non_invite_is_bounded_by_64_t1(
    clock: FakeClock, layer: TransactionLayer
) -> None:
    req = request("MESSAGE")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    txn.start_guard()  # what the endpoint does when the TU did not answer at once
    assert txn.timers["guard"] - clock.monotonic() == 64 * T1
    assert kinds(advance_to(clock, layer, txn.timers["guard"])) == ["Timeout", "Terminated"]
    assert len(layer) == 0


def test_answered_non_invite_cancels_the_guard(clock: FakeClock, layer: TransactionLayer) -> None:
    req = request("MESSAGE")
    txn = layer.receive_request(req, UDP)[0].transaction  # type: ignore[union-attr]
    assert txn is not None
    txn.start_guard()
    clock.advance(10)
    layer.send_response(txn, response_to(req, 202))
    assert set(txn.timers) == {"J"}
