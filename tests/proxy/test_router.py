"""Router: forking, fork-late, pushes and held MESSAGEs, driven with a FakeClock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.push.request import CallEndReason, Provider, PushKind, Service
from sipwake.sip.message import Response
from sipwake.sip.transaction import Address, DeliverRequest
from sipwake.store import Store, open_url
from sipwake.store.base import StoreUnavailable

from .router_helpers import (
    ANDROID,
    REMOTE_ONLY,
    VOIP,
    Harness,
    contact,
    make_harness,
    register,
    request,
)

V_TOKEN = "aa" * 32
R_TOKEN = "bb" * 32


def ios(port: int, instance: str = "00000000-0000-0000-0000-000000000001") -> str:
    return contact(port, VOIP.format(voip=V_TOKEN, remote=R_TOKEN), instance=instance)


async def test_call_to_sleeping_ios_voip_device_pushes_then_rings_it_when_it_registers(
    h: Harness,
) -> None:
    await h.register(ios(6001), 6001)
    invite = request("INVITE")
    h.endpoint.receive(invite)
    await h.settle()

    # The INVITE went to the registered flow, record-routed, with our Via on top.
    ((first, addr),) = h.wire.requests("INVITE")
    assert addr == Address("UDP", "127.0.0.1", 6001)
    assert first.uri.startswith("sip:bob@127.0.0.1:6001")
    assert first.headers.get("record-route") == "<sip:127.0.0.1:5060;transport=udp;lr>"
    assert first.via_list[0].host == "127.0.0.1" and len(first.via_list) == 2
    assert first.max_forwards == 69

    # One PushKit push to the VoIP token, with the call's TTL; the caller hears 110.
    (push,) = h.recorder.pushes
    assert push.kind is PushKind.CALL
    assert push.destination.service is Service.VOIP and push.destination.token == V_TOKEN
    assert push.call_id == invite.call_id and push.ttl == 30
    assert h.wire.statuses() == [100, 110]

    # The woken app registers from a new port: the INVITE goes there at once.
    await h.register(ios(6002), 6002)
    invites = h.wire.requests("INVITE")
    assert len(invites) == 2 and invites[1][1].port == 6002
    h.endpoint.answer(invites[1][0], 180)
    h.endpoint.answer(invites[1][0], 200)
    assert h.wire.statuses() == [100, 110, 180, 200]
    ok = h.wire.responses()[-1]
    assert len(ok.via_list) == 1 and ok.via_list[0].branch == invite.via_list[0].branch

    # Nothing more is pushed, and the call ended no timer with a 480.
    await h.advance(60)
    assert len(h.recorder.pushes) == 1
    assert 480 not in h.wire.statuses()


async def register_on_the_wire(h: Harness, contact_value: str, port: int) -> None:
    """A REGISTER through its server transaction: its 200 OK goes on the wire."""
    req, source = register(contact_value, port=port)
    actions = h.endpoint.layer.receive_request(req, source)
    (txn,) = [a.transaction for a in actions if isinstance(a, DeliverRequest)]
    assert txn is not None
    h.registrar.on_register(h.endpoint, txn, req, source)
    await asyncio.gather(*list(h.registrar._tasks))
    await h.router.drain()


async def test_woken_device_gets_its_register_200_before_the_held_invite(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    await register_on_the_wire(h, ios(6002), 6002)
    to_device = [
        m.status if isinstance(m, Response) else m.method
        for m, a in h.wire.sent
        if a == Address("UDP", "127.0.0.1", 6002)
    ]
    assert to_device == [200, "INVITE"]


async def test_woken_device_gets_its_register_200_before_the_held_message(h: Harness) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="held"))
    await h.settle()
    await h.advance(2)
    assert 202 in h.wire.statuses()
    await register_on_the_wire(h, contact(6002, ANDROID.format(token="fcm-1")), 6002)
    to_device = [
        m.status if isinstance(m, Response) else m.method
        for m, a in h.wire.sent
        if a == Address("UDP", "127.0.0.1", 6002)
    ]
    assert to_device == [200, "MESSAGE"]


async def test_no_registration_is_480_after_call_fork_timeout(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    await h.advance(29)
    assert h.wire.statuses() == [100, 110]
    await h.advance(2)
    assert h.wire.statuses()[-1] == 480


async def test_android_device_gets_one_high_priority_data_push(h: Harness) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-tok-1")), 6001)
    h.endpoint.receive(request("INVITE"))
    h.endpoint.receive(request("INVITE", call_id="other"))
    await h.settle()
    kinds = [(p.kind, p.destination.provider, p.destination.token) for p in h.recorder.pushes]
    assert kinds == [(PushKind.CALL, Provider.FCM, "fcm-tok-1")] * 2


async def test_same_call_id_pushes_once_per_token(h: Harness) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-tok-1")), 6001)
    h.endpoint.receive(request("INVITE", call_id="same"))
    await h.settle()
    h.endpoint.receive(request("INVITE", call_id="same"))  # e.g. a second fork of one call
    await h.settle()
    assert len(h.recorder.pushes) == 1


async def test_remote_only_ios_rings_repeatedly_and_gets_a_final_alert_on_cancel(
    store: Store,
) -> None:
    h = make_harness(store, "[push]\ncall-remote-push-interval = 5\n")
    await h.register(contact(6001, REMOTE_ONLY.format(remote=R_TOKEN)), 6001)
    invite = request("INVITE")
    txn = h.endpoint.receive(invite)
    await h.settle()
    await h.advance(5)
    await h.advance(5)
    ringing = h.recorder.pushes
    assert [p.kind for p in ringing] == [PushKind.RINGING] * 3
    assert {p.collapse_id for p in ringing} == {invite.call_id}

    cancel = request("CANCEL", call_id=invite.call_id, extra='Reason: SIP;cause=200;text="x"')
    cancel.headers.set("Via", invite.headers.get("via") or "")
    cancel.headers.set("From", invite.headers.get("from") or "")
    h.endpoint.receive(cancel)
    await h.settle()
    assert txn is not None and txn.last_response is not None
    assert txn.last_response.status == 487
    final = h.recorder.pushes[-1]
    assert final.kind is PushKind.CALL_ENDED
    assert final.end_reason is CallEndReason.ANSWERED_ELSEWHERE
    assert final.collapse_id == invite.call_id
    await h.advance(20)
    assert len(h.recorder.pushes) == 4  # the ringing stopped
    await h.router.aclose()


async def test_missed_call_gives_missed_alert(store: Store) -> None:
    h = make_harness(store)
    await h.register(contact(6001, REMOTE_ONLY.format(remote=R_TOKEN)), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    await h.advance(31)
    assert h.wire.statuses()[-1] == 480
    final = h.recorder.pushes[-1]
    assert final.kind is PushKind.CALL_ENDED and final.end_reason is CallEndReason.MISSED
    await h.router.aclose()


async def test_cancel_cancels_ringing_branches_with_487(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    invite = request("INVITE")
    h.endpoint.receive(invite)
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    h.endpoint.answer(branch, 180)
    cancel = request("CANCEL", call_id=invite.call_id)
    cancel.headers.set("Via", invite.headers.get("via") or "")
    h.endpoint.receive(cancel)
    ((sent_cancel, addr),) = h.wire.requests("CANCEL")
    assert addr.port == 6001
    assert sent_cancel.via_list[0].branch == branch.via_list[0].branch
    assert h.wire.statuses()[-2:] == [200, 487]  # 200 for the CANCEL, 487 for the INVITE


async def test_ios_voip_device_waking_after_cancel_gets_invite_then_cancel(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    invite = request("INVITE")
    h.endpoint.receive(invite)
    await h.settle()
    cancel = request("CANCEL", call_id=invite.call_id)
    cancel.headers.set("Via", invite.headers.get("via") or "")
    h.endpoint.receive(cancel)
    assert h.wire.statuses()[-1] == 487

    await h.register(ios(6002), 6002)
    late = [r for r, a in h.wire.requests("INVITE") if a.port == 6002]
    assert len(late) == 1
    h.endpoint.answer(late[0], 180)  # CallKit reports the call...
    cancels = [a.port for _, a in h.wire.requests("CANCEL")]
    assert cancels == [6002]  # ... and it is cancelled: a missed call
    assert h.wire.statuses().count(180) == 0  # the caller hears nothing of it


async def test_2xx_cancels_other_branches_with_reason(h: Harness) -> None:
    await h.register(contact(6001, instance="00000000-0000-0000-0000-00000000000a"), 6001)
    await h.register(contact(6002, instance="00000000-0000-0000-0000-00000000000b"), 6002)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    (b1, _), (b2, _) = h.wire.requests("INVITE")
    h.endpoint.answer(b1, 180)
    h.endpoint.answer(b2, 180)
    h.endpoint.answer(b2, 200)
    ((cancel, addr),) = h.wire.requests("CANCEL")
    assert addr.port == 6001
    assert "cause=200" in (cancel.headers.get("reason") or "")
    assert h.wire.statuses()[-1] == 200


async def test_best_response_and_6xx(h: Harness) -> None:
    for i, port in enumerate((6001, 6002, 6003)):
        await h.register(contact(port, instance=f"00000000-0000-0000-0000-00000000000{i}"), port)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    (b1, _), (b2, _), (b3, _) = h.wire.requests("INVITE")
    h.endpoint.answer(b1, 486)
    assert h.wire.statuses() == [100]  # others still pending
    h.endpoint.answer(b2, 180)
    h.endpoint.answer(b3, 603)
    assert h.wire.statuses()[-1] == 603  # a 6xx ends the call at once
    assert [a.port for _, a in h.wire.requests("CANCEL")] == [6002]


async def test_all_branches_failing_without_push_gives_best_final(h: Harness) -> None:
    await h.register(contact(6001, instance="00000000-0000-0000-0000-000000000001"), 6001)
    await h.register(contact(6002, instance="00000000-0000-0000-0000-000000000002"), 6002)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    (b1, _), (b2, _) = h.wire.requests("INVITE")
    h.endpoint.answer(b1, 503)
    h.endpoint.answer(b2, 486)
    assert h.wire.statuses()[-1] == 486


async def test_unknown_aor_is_480_at_once(h: Harness) -> None:
    h.endpoint.receive(request("INVITE", to="sip:nobody@example.org"))
    await h.settle()
    assert h.wire.statuses()[-1] == 480


@pytest.mark.parametrize(
    ("extra", "body", "method", "to_tag"),
    [
        ("Priority: non-urgent", "", "INVITE", None),
        ("Replaces: abc;to-tag=1;from-tag=2", "", "INVITE", None),
        ("Content-Type: application/im-iscomposing+xml", "<x/>", "MESSAGE", None),
        ("Content-Type: message/imdn+xml", "<imdn/>", "MESSAGE", None),
    ],
)
async def test_requests_that_never_push(
    h: Harness, extra: str, body: str, method: str, to_tag: str | None
) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-tok-1")), 6001)
    h.endpoint.receive(request(method, extra=extra, body=body, to_tag=to_tag))
    await h.settle()
    assert h.recorder.pushes == []
    assert len(h.wire.requests(method)) == 1  # still forwarded to the device


async def test_in_dialog_request_follows_route_and_is_not_pushed(h: Harness) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-tok-1")), 6001)
    bye = request(
        "BYE",
        to="sip:bob@127.0.0.1:6001",
        to_tag="callee",
        extra="Route: <sip:127.0.0.1:5060;transport=udp;lr>",
    )
    h.endpoint.receive(bye)
    await h.settle()
    ((fwd, addr),) = h.wire.requests("BYE")
    assert addr == Address("UDP", "127.0.0.1", 6001)
    assert fwd.headers.get("route") is None  # our Route entry consumed
    assert fwd.headers.get("record-route") is None
    assert h.recorder.pushes == []
    h.endpoint.answer(fwd, 200)
    assert h.wire.statuses()[-1] == 200


async def test_ack_for_2xx_is_forwarded_statelessly(h: Harness) -> None:
    ack = request(
        "ACK", to="sip:bob@127.0.0.1:6001", to_tag="x",
        extra="Route: <sip:127.0.0.1:5060;lr>",
    )  # fmt: skip
    h.endpoint.receive(ack)
    ((fwd, addr),) = h.wire.requests("ACK")
    assert addr.port == 6001 and len(fwd.via_list) == 2


async def test_pn_timeout_and_retransmissions(store: Store) -> None:
    h = make_harness(
        store, "[push]\ntimeout = 3\nretransmission-count = 2\nretransmission-interval = 4\n"
    )
    await h.register(contact(6001, ANDROID.format(token="t1") + ";pn-timeout=1"), 6001)
    await h.register(
        contact(6002, ANDROID.format(token="t2"), instance="00000000-0000-0000-0000-000000000002"),
        6002,
    )
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    assert h.recorder.pushes == []
    await h.advance(1)
    assert [p.destination.token for p in h.recorder.pushes] == ["t1"]
    await h.advance(2)
    assert [p.destination.token for p in h.recorder.pushes] == ["t1", "t2"]
    for _ in range(20):
        await h.advance(1)
    tokens = [p.destination.token for p in h.recorder.pushes]
    assert tokens.count("t1") == 3 and tokens.count("t2") == 3
    await h.router.aclose()


async def test_answering_device_gets_no_push(store: Store) -> None:
    h = make_harness(store, "[push]\ntimeout = 2\n")
    await h.register(contact(6001, ANDROID.format(token="t1")), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    h.endpoint.answer(branch, 180)  # the app was awake
    await h.advance(5)
    assert h.recorder.pushes == []
    await h.router.aclose()


# ---------------------------------------------------------------------------- MESSAGE


async def test_message_to_sleeping_device_is_held_202_and_delivered_once_in_order(
    h: Harness, store: Store
) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", call_id="m1", body="first"))
    h.endpoint.receive(request("MESSAGE", call_id="m2", body="second"))
    await h.settle()
    assert [p.kind for p in h.recorder.pushes] == [PushKind.MESSAGE] * 2
    assert h.recorder.pushes[0].ttl == h.config.router.message_delivery_timeout
    assert 202 not in h.wire.statuses()
    await h.advance(2)
    assert h.wire.statuses().count(202) == 2
    assert await store.messages.count("sip:bob@example.org") == 2

    # The device wakes and registers: the held MESSAGEs come in order, one at a time.
    await h.register(contact(6005, ANDROID.format(token="fcm-1")), 6005)
    for _ in range(20):
        await h.settle()
        delivered = [(r, a) for r, a in h.wire.requests("MESSAGE") if a.port == 6005]
        answered = sum(1 for r, _ in delivered if r.headers.get("x-answered"))
        if len(delivered) > answered:
            r, _ = delivered[-1]
            r.headers.add("X-Answered", "1")
            h.endpoint.answer(r, 200)
        if len(delivered) == 2 and answered == 2:
            break
    delivered = [r for r, a in h.wire.requests("MESSAGE") if a.port == 6005]
    assert [r.body for r in delivered] == [b"first", b"second"]
    assert await store.messages.count("sip:bob@example.org") == 0

    # Registering again delivers nothing more.
    await h.register(contact(6006, ANDROID.format(token="fcm-1")), 6006)
    await h.settle()
    assert [a.port for _, a in h.wire.requests("MESSAGE")].count(6006) == 0


async def test_message_answered_in_time_is_not_held(h: Harness, store: Store) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="hi"))
    await h.settle()
    ((m, _),) = h.wire.requests("MESSAGE")
    h.endpoint.answer(m, 200)
    await h.advance(3)
    assert h.wire.statuses()[-1] == 200 and 202 not in h.wire.statuses()
    assert await store.messages.count() == 0


async def test_held_message_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await open_url("", tmp_path)
    h = make_harness(store, clock=clock)
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="kept"))
    await h.settle()
    await h.advance(2)
    assert 202 in h.wire.statuses()
    await h.router.aclose()
    await store.close()

    store = await open_url("", tmp_path)
    h2 = make_harness(store, clock=clock)
    await h2.router.start()
    await h2.register(contact(6009, ANDROID.format(token="fcm-1")), 6009)
    await h2.settle()
    ((m, addr),) = h2.wire.requests("MESSAGE")
    assert addr.port == 6009 and m.body == b"kept"
    assert len(m.via_list) == 1  # the original hops are gone: this is our request
    h2.endpoint.answer(m, 200)
    await h2.settle()
    assert await store.messages.count() == 0
    await h2.router.aclose()
    await store.close()


async def test_2xx_retransmission_reaches_the_caller(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    h.endpoint.answer(branch, 200)
    h.endpoint.answer(branch, 200)  # the callee did not get the ACK yet
    assert h.wire.statuses().count(200) == 2


async def test_device_on_tcp_gets_double_record_route(h: Harness) -> None:
    req, _ = register(contact(6001), "bob", 6001)
    response = await h.registrar.handle_register(req, Address("TCP", "127.0.0.1", 6001))
    assert response.status == 200
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((fwd, addr),) = h.wire.requests("INVITE")
    assert addr.transport == "TCP"
    assert fwd.headers.get_all("record-route") == [
        "<sip:127.0.0.1:5060;transport=tcp;lr>",
        "<sip:127.0.0.1:5060;transport=udp;lr>",
    ]
    assert fwd.via_list[0].transport == "TCP"


async def test_request_for_the_domain_itself_is_404_not_a_loop(h: Harness) -> None:
    h.endpoint.receive(request("MESSAGE", to="sip:example.org"))
    await h.settle()
    assert h.wire.statuses()[-1] == 404
    assert h.wire.requests("MESSAGE") == []


async def test_rejected_token_ends_the_wait_at_once(h: Harness) -> None:
    h.recorder.reject.add("dead-token")
    await h.register(contact(6001, ANDROID.format(token="dead-token")), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    h.endpoint.on_timeout_of(branch)
    assert h.wire.statuses()[-1] == 480  # not 30 s later at call-fork-timeout
    assert 110 not in h.wire.statuses()


async def test_ios_voip_device_answering_a_cancelled_call_is_acked_and_hung_up(
    h: Harness,
) -> None:
    await h.register(ios(6001), 6001)
    invite = request("INVITE")
    h.endpoint.receive(invite)
    await h.settle()
    cancel = request("CANCEL", call_id=invite.call_id)
    cancel.headers.set("Via", invite.headers.get("via") or "")
    h.endpoint.receive(cancel)
    await h.register(ios(6002), 6002)
    ((late, _),) = [(r, a) for r, a in h.wire.requests("INVITE") if a.port == 6002]
    h.endpoint.answer(late, 200, Contact="<sip:bob@127.0.0.1:6002>")  # before any 180
    ((ack, a1),) = h.wire.requests("ACK")
    ((bye, a2),) = h.wire.requests("BYE")
    assert a1.port == a2.port == 6002
    assert ack.uri == bye.uri == "sip:bob@127.0.0.1:6002"
    assert (ack.headers.get("to") or "").endswith("tag=callee")
    assert h.wire.statuses().count(200) == 1  # only the 200 for the CANCEL
    h.endpoint.answer(late, 200, Contact="<sip:bob@127.0.0.1:6002>")  # retransmitted
    assert h.wire.statuses().count(200) == 1


async def test_held_message_expires_after_message_delivery_timeout(store: Store) -> None:
    h = make_harness(store, "[router]\nmessage-delivery-timeout = 600\n")
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="late"))
    await h.settle()
    await h.advance(2)
    assert await store.messages.count() == 1
    h.clock.advance(599)
    assert h.router.held is not None
    assert await h.router.held.expire_due() == []
    h.clock.advance(1)
    (gone,) = await h.router.held.expire_due()
    assert gone.aor == "sip:bob@example.org"
    await h.register(contact(6002, ANDROID.format(token="fcm-1")), 6002)
    await h.settle()
    assert [a.port for _, a in h.wire.requests("MESSAGE")] == [6001]  # nothing delivered
    await h.router.aclose()


async def test_message_queues_behind_held_ones_and_keeps_order(h: Harness, store: Store) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="one"))
    await h.settle()
    await h.advance(2)  # held, 202
    h.endpoint.receive(request("MESSAGE", body="two"))
    await h.settle()
    assert h.wire.statuses().count(202) == 2  # at once: it queues behind "one"
    assert len(h.wire.requests("MESSAGE")) == 1  # not sent past the held one
    assert [p.kind for p in h.recorder.pushes] == [PushKind.MESSAGE] * 2

    await h.register(contact(6005, ANDROID.format(token="fcm-1")), 6005)
    for _ in range(2):
        (m, _), *_ = [(r, a) for r, a in h.wire.requests("MESSAGE") if a.port == 6005][-1:]
        h.endpoint.answer(m, 200)
        await h.settle()
    bodies = [r.body for r, a in h.wire.requests("MESSAGE") if a.port == 6005]
    assert bodies == [b"one", b"two"]
    assert await store.messages.count() == 0


async def test_ringing_device_is_not_cut_at_call_fork_timeout(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    await h.register(ios(6002), 6002)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ringing = next(r for r, a in h.wire.requests("INVITE") if a.port == 6001)
    h.endpoint.answer(ringing, 180)
    await h.advance(31)  # past call-fork-timeout: the sleeping iOS device is given up
    assert 480 not in h.wire.statuses()
    assert [a.port for _, a in h.wire.requests("CANCEL")] == []  # 6002 never answered
    h.endpoint.answer(ringing, 486)
    assert h.wire.statuses()[-1] == 486


async def test_timer_c_ends_a_call_that_rings_forever(h: Harness) -> None:
    await h.register(contact(6001), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((ringing, _),) = h.wire.requests("INVITE")
    h.endpoint.answer(ringing, 180)
    await h.advance(31)
    await h.advance(181)
    assert h.wire.statuses()[-1] == 480
    assert [a.port for _, a in h.wire.requests("CANCEL")] == [6001]


# ---------------------------------------------------------------------------- store faults


async def test_store_unavailable_on_lookup_is_503_with_retry_after(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(aor: str, now: float | None = None) -> list[object]:
        raise StoreUnavailable("redis restarting", retry_after=7)

    # The store fails, not the registrar (compiled with mypyc: its methods are fixed).
    monkeypatch.setattr(h.router.registrar.store.bindings, "get", down)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    final = h.wire.responses()[-1]
    assert final.status == 503 and final.headers.get("retry-after") == "7"


async def test_store_unavailable_on_hold_is_503_with_retry_after(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    assert h.router.held is not None

    async def down(aor: str, message: object, *more: object) -> str:
        raise StoreUnavailable("redis restarting", retry_after=9)

    monkeypatch.setattr(h.router.held, "hold", down)
    h.endpoint.receive(request("MESSAGE", body="hi"))
    await h.settle()
    await h.advance(2)
    final = h.wire.responses()[-1]
    assert final.status == 503 and final.headers.get("retry-after") == "9"
    assert 202 not in h.wire.statuses()


# ---------------------------------------------------------------------------- MESSAGE per device

PHONE = "00000000-0000-0000-0000-0000000000a1"
TABLET = "00000000-0000-0000-0000-0000000000b2"


def phone(port: int) -> str:
    return contact(port, ANDROID.format(token="fcm-phone"), instance=PHONE)


def tablet(port: int) -> str:
    return contact(port, ANDROID.format(token="fcm-tablet"), instance=TABLET)


async def take_all(h: Harness, port: int) -> list[bytes]:
    """The device on ``port`` answers 200 to each held MESSAGE it gets; their bodies."""
    answered = 0
    while answered < 20:
        await h.settle()
        got = [r for r, a in h.wire.requests("MESSAGE") if a.port == port]
        if len(got) == answered:
            break
        h.endpoint.answer(got[answered], 200)
        answered += 1
    return [r.body for r, a in h.wire.requests("MESSAGE") if a.port == port]


async def test_held_message_reaches_every_device_of_the_aor_once(h: Harness, store: Store) -> None:
    await h.register(phone(6001), 6001)
    await h.register(tablet(6002), 6002)
    h.endpoint.receive(request("MESSAGE", body="one"))
    h.endpoint.receive(request("MESSAGE", body="two"))
    await h.settle()
    await h.advance(2)
    assert h.wire.statuses().count(202) == 2

    await h.register(phone(6011), 6011)  # the phone wakes first
    assert await take_all(h, 6011) == [b"one", b"two"]
    assert await store.messages.count("sip:bob@example.org") > 0  # the tablet waits

    await h.register(tablet(6012), 6012)  # then the tablet: it gets them too, in order
    assert await take_all(h, 6012) == [b"one", b"two"]
    assert await store.messages.count() == 0  # every device had them: done

    await h.register(phone(6021), 6021)
    await h.register(tablet(6022), 6022)
    await h.settle()
    ports = [a.port for _, a in h.wire.requests("MESSAGE")]
    assert 6021 not in ports and 6022 not in ports


async def test_device_registering_after_the_message_arrived_gets_it_while_held(
    h: Harness, store: Store
) -> None:
    await h.register(phone(6001), 6001)
    h.endpoint.receive(request("MESSAGE", body="hello"))
    await h.settle()
    await h.advance(2)
    assert 202 in h.wire.statuses()

    await h.register(tablet(6012), 6012)  # a new device of the AOR, while it is held
    assert await take_all(h, 6012) == [b"hello"]
    assert await store.messages.count() > 0  # still owed to the phone
    await h.register(tablet(6013), 6013)  # once per device
    await h.settle()
    assert [a.port for _, a in h.wire.requests("MESSAGE")].count(6013) == 0

    await h.register(phone(6011), 6011)
    assert await take_all(h, 6011) == [b"hello"]
    assert await store.messages.count() == 0


async def test_message_answered_by_an_awake_device_is_held_for_the_sleeping_one(
    h: Harness, store: Store
) -> None:
    await h.register(phone(6001), 6001)  # asleep, woken by a push
    await h.register(contact(6003, instance=TABLET), 6003)  # awake, no push
    h.endpoint.receive(request("MESSAGE", body="hi both"))
    await h.settle()
    (m,) = [r for r, a in h.wire.requests("MESSAGE") if a.port == 6003]
    h.endpoint.answer(m, 200)
    await h.settle()
    assert h.wire.statuses()[-1] == 200  # the caller hears the tablet's answer

    await h.register(phone(6011), 6011)
    assert await take_all(h, 6011) == [b"hi both"]
    assert await store.messages.count() == 0
    await h.register(contact(6004, instance=TABLET), 6004)
    await h.settle()
    assert [a.port for _, a in h.wire.requests("MESSAGE")].count(6004) == 0


async def test_per_device_delivery_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    store = await open_url("", tmp_path)
    h = make_harness(store, clock=clock)
    await h.register(phone(6001), 6001)
    await h.register(tablet(6002), 6002)
    h.endpoint.receive(request("MESSAGE", body="kept"))
    await h.settle()
    await h.advance(2)
    await h.register(phone(6011), 6011)
    assert await take_all(h, 6011) == [b"kept"]
    await h.router.aclose()
    await store.close()

    store = await open_url("", tmp_path)
    h2 = make_harness(store, clock=clock)
    await h2.router.start()
    await h2.register(phone(6021), 6021)  # the phone had it before the restart
    await h2.settle()
    assert h2.wire.requests("MESSAGE") == []
    await h2.register(tablet(6022), 6022)
    assert await take_all(h2, 6022) == [b"kept"]
    assert await store.messages.count() == 0
    await h2.router.aclose()
    await store.close()


async def test_stop_right_after_the_device_took_a_held_message_forgets_it(tmp_path: Path) -> None:
    """A device answers 200 to a held MESSAGE and the server stops at once: the MESSAGE
    is done (not delivered again after the restart)."""
    store = await open_url("", tmp_path)
    h = make_harness(store)
    await h.register(contact(6001, ANDROID.format(token="fcm-1")), 6001)
    h.endpoint.receive(request("MESSAGE", body="once"))
    await h.settle()
    await h.advance(2)
    assert await store.messages.count() == 1
    await h.register(contact(6002, ANDROID.format(token="fcm-1")), 6002)
    ((m, _),) = [(r, a) for r, a in h.wire.requests("MESSAGE") if a.port == 6002]
    h.endpoint.answer(m, 200)
    await h.router.aclose()  # no settle: the stop comes before the delivery is recorded
    assert await store.messages.count() == 0
    await store.close()
