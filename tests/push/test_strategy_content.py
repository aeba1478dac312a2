"""What the strategy puts in each push: message fields, group-chat invitations, final
alert texts, pn-silent and the uuid kept across repeats (FakeClock, no I/O)."""

from __future__ import annotations

import json

import pytest

from sipwake.clock import FakeClock
from sipwake.push.params import parse_push_params
from sipwake.push.providers.apns import build_message, build_payload
from sipwake.push.providers.fcm import data_fields
from sipwake.push.request import CallEndReason, PushKind, PushRequest, Service
from sipwake.push.strategy import (
    Caller,
    DevicePush,
    RequestKind,
    chat_room_of,
    is_group_chat_invite,
)
from sipwake.sip.message import Request, parse_message

from .test_strategy import ANDROID, IOS_BOTH, IOS_REMOTE, strategy

GROUP = Caller(
    "gc-1",
    "sip:chatroom-x1y2@conf.example.org",
    "",
    group_chat=True,
    chat_room_addr="chatroom-x1y2",
)


def pushes(plan: DevicePush | None, clock: FakeClock, seconds: int) -> list[PushRequest]:
    assert plan is not None
    out: list[PushRequest] = []
    for _ in range(seconds):
        out += plan.due(clock.monotonic())
        clock.advance(1)
    return out


def test_ios_message_alert_is_mutable_with_an_empty_chat_room() -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    plan = s.plan(RequestKind.MESSAGE, parse_push_params(IOS_BOTH), Caller("m-1"))
    (push,) = pushes(plan, clock, 1)
    assert push.mutable_content and push.chat_room_addr == "" and not push.group_chat
    payload = build_payload(push, clock)
    assert payload["aps"]["mutable-content"] == 1
    assert payload["aps"]["alert"]["loc-key"] == "IM_MSG"
    # Present and empty, as Flexisip sends it: Linphone's extension reads a non-empty
    # chat-room-addr as a chat-room invitation; it finds the message by call-id.
    assert payload["chat-room-addr"] == "" and payload["call-id"] == "m-1"


def test_android_message_has_no_chat_room_key() -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    plan = s.plan(RequestKind.MESSAGE, parse_push_params(ANDROID), Caller("m-1"))
    (push,) = pushes(plan, clock, 1)
    assert not push.mutable_content
    data = data_fields(push, clock.wall())
    assert data["loc-key"] == "IM_MSG" and "chat-room-addr" not in data


@pytest.mark.parametrize(
    ("params", "service"), [(IOS_BOTH, Service.REMOTE), (IOS_REMOTE, Service.REMOTE)]
)
def test_group_chat_invitation_is_a_message_push_with_gc_msg(
    params: dict[str, str], service: Service
) -> None:
    s, clock = strategy("[push]\ntimeout = 0\nmessage-time-to-live = 600\n")
    plan = s.plan(RequestKind.CALL, parse_push_params(params), GROUP)
    sent = pushes(plan, clock, 10)
    (push,) = sent  # no ringing repeats, no PushKit
    assert push.kind is PushKind.MESSAGE and push.destination.service is service
    assert push.ttl == 600 and push.group_chat and push.chat_room_addr == "chatroom-x1y2"
    payload = build_payload(push, clock)
    assert payload["aps"]["alert"]["loc-key"] == "GC_MSG"
    assert payload["aps"]["mutable-content"] == 1
    assert payload["chat-room-addr"] == "chatroom-x1y2"
    assert build_message(push, clock).header("apns-push-type") == "alert"


def test_group_chat_invitation_uses_pn_groupchat_str_and_reaches_android() -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    params = parse_push_params({**ANDROID, "pn-groupchat-str": "GROUP_INVITE"})
    (push,) = pushes(s.plan(RequestKind.CALL, params, GROUP), clock, 1)
    data = data_fields(push, clock.wall())
    assert data["loc-key"] == "GROUP_INVITE" and data["chat-room-addr"] == "chatroom-x1y2"


@pytest.mark.parametrize(
    ("reason", "param", "text"),
    [
        (CallEndReason.MISSED, "pn-missing-call-str", "Appel manqué"),
        (CallEndReason.ANSWERED_ELSEWHERE, "pn-call-accepted-elsewhere-str", "ANSWERED_KEY"),
        (CallEndReason.DECLINED_ELSEWHERE, "pn-call-declined-elsewhere-str", "DECLINED_KEY"),
    ],
)
def test_final_alert_uses_the_device_text(reason: CallEndReason, param: str, text: str) -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    plan = s.plan(RequestKind.CALL, parse_push_params({**IOS_REMOTE, param: text}), Caller("c"))
    pushes(plan, clock, 1)
    assert plan is not None
    final = plan.finish(reason)
    assert final is not None
    assert build_payload(final, clock)["aps"]["alert"]["loc-key"] == text
    # The other reasons keep their default key.
    other = next(r for r in CallEndReason if r is not reason)
    plan2 = s.plan(RequestKind.CALL, parse_push_params({**IOS_REMOTE, param: text}), Caller("d"))
    pushes(plan2, clock, 1)
    assert plan2 is not None
    final2 = plan2.finish(other)
    assert final2 is not None
    key = build_payload(final2, clock)["aps"]["alert"]["loc-key"]
    assert key == {"missed": "IC_MISSED", "answered-elsewhere": "IC_ANSWERED_ELSEWHERE",
                   "declined-elsewhere": "IC_DECLINED_ELSEWHERE"}[other.value]  # fmt: skip


def test_final_alert_default_keys_without_device_texts() -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    plan = s.plan(RequestKind.CALL, parse_push_params(IOS_REMOTE), Caller("c"))
    pushes(plan, clock, 1)
    assert plan is not None
    final = plan.finish(CallEndReason.DECLINED_ELSEWHERE)
    assert final is not None and final.end_loc_key == ""
    assert build_payload(final, clock)["aps"]["alert"]["loc-key"] == "IC_DECLINED_ELSEWHERE"
    assert data_fields(final, clock.wall())["loc-key"] == "IC_DECLINED_ELSEWHERE"


@pytest.mark.parametrize(("value", "rings"), [("0", True), ("1", False), (None, False)])
def test_pn_silent_zero_asks_for_a_ringing_push(value: str | None, rings: bool) -> None:
    s, _ = strategy()
    params = dict(IOS_BOTH)
    if value is not None:
        params["pn-silent"] = value
    call = s.plan(RequestKind.CALL, parse_push_params(params), Caller("c"))
    message = s.plan(RequestKind.MESSAGE, parse_push_params(params), Caller("m"))
    assert call is not None and message is not None
    assert call.rings is rings
    assert message.rings is False  # a message has no caller to tell


def test_pushkit_retransmissions_keep_the_call_uuid() -> None:
    s, clock = strategy(
        "[push]\ntimeout = 0\nretransmission-count = 2\nretransmission-interval = 2\n"
    )
    sent = pushes(s.plan(RequestKind.CALL, parse_push_params(IOS_BOTH), Caller("c")), clock, 10)
    assert [p.kind for p in sent] == [PushKind.CALL] * 3
    assert len({p.uuid for p in sent}) == 1
    payloads = [build_payload(p, clock) for p in sent]
    assert {p["uuid"] for p in payloads} == {p["aps"]["uuid"] for p in payloads} == {sent[0].uuid}
    # Each is still its own notification: the first one's apns-id is the uuid.
    ids = [build_message(p, clock).header("apns-id") for p in sent]
    assert ids[0] == sent[0].uuid and len(set(ids)) == 3
    # Another call to the same device: another uuid.
    other = pushes(s.plan(RequestKind.CALL, parse_push_params(IOS_BOTH), Caller("d")), clock, 1)
    assert other[0].uuid != sent[0].uuid


def test_ringing_repeats_and_final_alert_keep_uuid_and_collapse_id() -> None:
    s, clock = strategy("[push]\ntimeout = 0\ncall-remote-push-interval = 2\n")
    plan = s.plan(RequestKind.CALL, parse_push_params(IOS_REMOTE), Caller("c-9"))
    sent = pushes(plan, clock, 5)
    assert plan is not None
    final = plan.finish(CallEndReason.MISSED)
    assert final is not None
    everything = [*sent, final]
    assert len(sent) == 3 and len({p.uuid for p in everything}) == 1
    headers = [build_message(p, clock) for p in everything]
    assert {m.header("apns-collapse-id") for m in headers} == {"c-9"}
    assert len({m.header("apns-id") for m in headers}) == 4


def test_android_retransmissions_keep_the_uuid_data_key() -> None:
    s, clock = strategy(
        "[push]\ntimeout = 0\nretransmission-count = 1\nretransmission-interval = 1\n"
    )
    sent = pushes(s.plan(RequestKind.CALL, parse_push_params(ANDROID), Caller("c")), clock, 3)
    assert len(sent) == 2
    assert len({data_fields(p, clock.wall())["uuid"] for p in sent}) == 1


def invite(
    content_type: str | None,
    from_uri: str = "sip:chatroom-x1y2@conf.example.org",
    method: str = "INVITE",
) -> Request:
    lines = [
        f"{method} sip:bob@example.org SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:7000;branch=z9hG4bKgc1",
        "Max-Forwards: 70",
        f"From: <{from_uri}>;tag=f1",
        "To: <sip:bob@example.org>",
        "Call-ID: gc-1",
        f"CSeq: 1 {method}",
    ]
    body = '<?xml version="1.0"?><resource-lists/>' if content_type else ""
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"Content-Length: {len(body)}", "", body]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


@pytest.mark.parametrize(
    ("content_type", "group"),
    [
        ("application/resource-lists+xml", True),
        ("Application/Resource-Lists+XML;text", True),
        ("application/resource-lists+xml;charset=utf-8;text", True),
        ("application/resource-lists+xml;charset=utf-8", False),  # params, none "text"
        ("application/sdp", False),
        (None, False),  # a call with a late offer stays a call
    ],
)
def test_group_chat_invite_decision(content_type: str | None, group: bool) -> None:
    assert is_group_chat_invite(invite(content_type)) is group


def test_chat_room_is_the_user_part_of_the_from() -> None:
    assert chat_room_of(invite("application/resource-lists+xml")) == "chatroom-x1y2"
    assert chat_room_of(invite(None, "tel:+33123456789")) == ""


def test_a_message_is_never_a_group_chat_invitation() -> None:
    assert not is_group_chat_invite(invite("application/resource-lists+xml", method="MESSAGE"))


def test_payload_json_of_a_group_invitation_is_compact_ascii_safe() -> None:
    s, clock = strategy("[push]\ntimeout = 0\n")
    (push,) = pushes(s.plan(RequestKind.CALL, parse_push_params(IOS_BOTH), GROUP), clock, 1)
    body = json.loads(build_message(push, clock).body)
    assert body["chat-room-addr"] == "chatroom-x1y2" and body["call-id"] == "gc-1"
