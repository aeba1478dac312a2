"""Router: what the pushes it sends say (messages, group-chat invitations, final alert
texts, pn-silent ringback, uuid across repeats), driven with a FakeClock."""

from __future__ import annotations

import pytest

from sipwake.push.request import CallEndReason, PushKind, Service
from sipwake.store import Store

from .router_helpers import ANDROID, REMOTE_ONLY, VOIP, Harness, contact, make_harness, request

V_TOKEN = "aa" * 32
R_TOKEN = "bb" * 32
RESOURCE_LISTS = '<?xml version="1.0"?><resource-lists><list/></resource-lists>'


def ios(port: int, extra: str = "") -> str:
    return contact(port, VOIP.format(voip=V_TOKEN, remote=R_TOKEN) + extra)


async def test_message_push_is_mutable_with_an_empty_chat_room(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    h.endpoint.receive(request("MESSAGE", extra="Content-Type: text/plain", body="hi"))
    await h.settle()
    (push,) = h.recorder.pushes
    assert push.kind is PushKind.MESSAGE and push.destination.service is Service.REMOTE
    assert push.mutable_content and push.chat_room_addr == "" and not push.group_chat
    assert push.strings.message_loc_key == "IM_MSG"


async def test_group_chat_invitation_is_pushed_as_a_message(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    invite = request(
        "INVITE",
        extra="Content-Type: application/resource-lists+xml",
        body=RESOURCE_LISTS,
    )
    invite.headers.set("From", "<sip:chatroom-5a6b@conf.example.org>;tag=gc")
    h.endpoint.receive(invite)
    await h.settle()
    (push,) = h.recorder.pushes
    assert push.kind is PushKind.MESSAGE  # not PushKit: iOS wants a call reported for those
    assert push.destination.token == R_TOKEN
    assert push.group_chat and push.chat_room_addr == "chatroom-5a6b" and push.mutable_content
    assert push.ttl == h.config.router.message_delivery_timeout  # a message's lifetime


async def test_plain_call_is_still_pushkit(h: Harness) -> None:
    await h.register(ios(6001), 6001)
    h.endpoint.receive(request("INVITE", extra="Content-Type: application/sdp", body="v=0"))
    await h.settle()
    (push,) = h.recorder.pushes
    assert push.kind is PushKind.CALL and push.destination.token == V_TOKEN
    assert not push.group_chat and push.chat_room_addr == ""


async def test_missed_call_alert_uses_the_device_text(store: Store) -> None:
    h = make_harness(store)
    params = REMOTE_ONLY.format(remote=R_TOKEN) + ";pn-missing-call-str=MISSED_CALL_TEXT"
    await h.register(contact(6001, params), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    await h.advance(31)
    final = h.recorder.pushes[-1]
    assert final.kind is PushKind.CALL_ENDED and final.end_reason is CallEndReason.MISSED
    assert final.final_loc_key() == "MISSED_CALL_TEXT"
    await h.router.aclose()


@pytest.mark.parametrize(("silent", "ringback"), [("0", True), ("1", False), (None, False)])
async def test_pn_silent_zero_gives_the_caller_ringback(
    h: Harness, silent: str | None, ringback: bool
) -> None:
    extra = f";pn-silent={silent}" if silent is not None else ""
    await h.register(ios(6001, extra), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    statuses = [s for s in h.wire.statuses() if s != 100]
    assert statuses == ([110, 180] if ringback else [110])
    # Every response but 100 has a To tag (RFC 3261 §8.2.6.2; a UA makes the early
    # dialog from the 180's), and ours are one dialog: the final 480 ends the one the
    # 180 began.
    await h.advance(31)
    ours = [r for r in h.wire.responses() if r.status != 100]
    assert [r.status for r in ours] == [*statuses, 480]
    tags = {r.to.tag if r.to is not None else None for r in ours}
    assert len(tags) == 1 and None not in tags
    await h.router.aclose()


async def test_no_ringback_when_a_device_already_rings(store: Store) -> None:
    h = make_harness(store, "[push]\ntimeout = 2\n")
    await h.register(ios(6001, ";pn-silent=0"), 6001)
    h.endpoint.receive(request("INVITE"))
    await h.settle()
    ((branch, _),) = h.wire.requests("INVITE")
    h.endpoint.answer(branch, 180)  # the app was awake and rings: no push, no extra 180
    await h.advance(5)
    assert h.recorder.pushes == []
    assert [s for s in h.wire.statuses() if s != 100] == [180]
    await h.router.aclose()


async def test_retransmitted_pushkit_pushes_keep_the_uuid(store: Store) -> None:
    h = make_harness(store, "[push]\nretransmission-count = 2\nretransmission-interval = 3\n")
    await h.register(ios(6001), 6001)
    await h.register(contact(6002, ANDROID.format(token="fcm-1")), 6002)
    invite = request("INVITE")
    h.endpoint.receive(invite)
    await h.settle()
    for _ in range(10):
        await h.advance(1)
    by_token: dict[str, set[str]] = {}
    for push in h.recorder.pushes:
        by_token.setdefault(push.destination.token, set()).add(push.uuid)
    counts = {t: sum(p.destination.token == t for p in h.recorder.pushes) for t in by_token}
    assert counts == {V_TOKEN: 3, "fcm-1": 3}
    assert all(len(uuids) == 1 for uuids in by_token.values())  # one uuid per device
    assert by_token[V_TOKEN] != by_token["fcm-1"]
    await h.router.aclose()
