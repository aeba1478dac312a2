"""Push strategy: which push for which device and request, and when (FakeClock, no I/O)."""

from __future__ import annotations

import tomllib

import pytest

from sipwake.clock import FakeClock
from sipwake.config import Config, parse_config
from sipwake.push.params import parse_push_params
from sipwake.push.request import CallEndReason, Provider, PushKind, Service
from sipwake.push.strategy import (
    Caller,
    PushStrategy,
    RequestKind,
    end_reason_of,
    no_push_reason,
)
from sipwake.sip.message import Request, parse_message

IOS_BOTH = {
    "pn-provider": "apns",
    "pn-param": "ABCD123456.org.example.app.voip&remote",
    "pn-prid": "aa11:voip&bb22:remote",
}
IOS_REMOTE = {"pn-provider": "apns", "pn-param": "ABCD123456.org.example.app", "pn-prid": "bb22"}
IOS_VOIP_ONLY = {
    "pn-provider": "apns",
    "pn-param": "ABCD123456.org.example.app.voip",
    "pn-prid": "aa11",
}
ANDROID = {"pn-provider": "fcm", "pn-param": "proj", "pn-prid": "tok"}
CALLER = Caller("call-1", "sip:alice@example.org", "Alice")


def config(text: str = "") -> Config:
    return parse_config(tomllib.loads(text))


def strategy(text: str = "") -> tuple[PushStrategy, FakeClock]:
    clock = FakeClock()
    return PushStrategy(config(text), clock), clock


@pytest.mark.parametrize(
    ("params", "kind", "push_kind", "service", "provider"),
    [
        (IOS_BOTH, RequestKind.CALL, PushKind.CALL, Service.VOIP, Provider.APNS),
        (IOS_REMOTE, RequestKind.CALL, PushKind.RINGING, Service.REMOTE, Provider.APNS),
        (ANDROID, RequestKind.CALL, PushKind.CALL, Service.REMOTE, Provider.FCM),
        (IOS_BOTH, RequestKind.MESSAGE, PushKind.MESSAGE, Service.REMOTE, Provider.APNS),
        (ANDROID, RequestKind.MESSAGE, PushKind.MESSAGE, Service.REMOTE, Provider.FCM),
    ],
)
def test_choice_of_push(
    params: dict[str, str],
    kind: RequestKind,
    push_kind: PushKind,
    service: Service,
    provider: Provider,
) -> None:
    s, clock = strategy()
    plan = s.plan(kind, parse_push_params(params), CALLER)
    assert plan is not None
    clock.advance(5)  # [push] timeout defaults to 5 s
    (push,) = plan.due(clock.monotonic())
    assert push.kind is push_kind
    assert push.destination.service is service and push.destination.provider is provider
    assert push.call_id == "call-1" and push.from_uri == "sip:alice@example.org"


def test_no_message_push_to_a_voip_only_ios_device() -> None:
    s, _ = strategy()
    assert s.plan(RequestKind.MESSAGE, parse_push_params(IOS_VOIP_ONLY), CALLER) is None


def test_timeout_then_pn_timeout_override() -> None:
    s, clock = strategy("[push]\ntimeout = 3\n")
    plan = s.plan(RequestKind.CALL, parse_push_params(ANDROID), CALLER)
    assert plan is not None
    clock.advance(2.9)
    assert plan.due(clock.monotonic()) == []
    clock.advance(0.1)
    assert len(plan.due(clock.monotonic())) == 1
    fast = s.plan(
        RequestKind.CALL, parse_push_params({**ANDROID, "pn-timeout": "0"}), Caller("call-2")
    )
    assert fast is not None and len(fast.due(clock.monotonic())) == 1


def test_ttls_follow_call_fork_timeout_and_message_settings() -> None:
    s, clock = strategy(
        "[router]\ncall-fork-timeout = 42\nmessage-delivery-timeout = 3600\n[push]\ntimeout = 0\n"
    )
    call = s.plan(RequestKind.CALL, parse_push_params(ANDROID), Caller("c1"))
    msg = s.plan(RequestKind.MESSAGE, parse_push_params(ANDROID), Caller("m1"))
    assert call is not None and msg is not None
    assert call.due(clock.monotonic())[0].ttl == 42
    assert msg.due(clock.monotonic())[0].ttl == 3600  # message-time-to-live 0: delivery
    s2, clock2 = strategy("[push]\ntimeout = 0\nmessage-time-to-live = 60\n")
    msg2 = s2.plan(RequestKind.MESSAGE, parse_push_params(ANDROID), Caller("m1"))
    assert msg2 is not None and msg2.due(clock2.monotonic())[0].ttl == 60


def test_retransmissions_until_stopped() -> None:
    s, clock = strategy(
        "[push]\ntimeout = 0\nretransmission-count = 2\nretransmission-interval = 3\n"
    )
    plan = s.plan(RequestKind.CALL, parse_push_params(ANDROID), CALLER)
    assert plan is not None
    sent = []
    for _ in range(12):
        sent += plan.due(clock.monotonic())
        clock.advance(1)
    assert len(sent) == 3  # the push and two retransmissions, 3 s apart
    plan2 = s.plan(RequestKind.CALL, parse_push_params(ANDROID), Caller("call-2"))
    assert plan2 is not None
    assert len(plan2.due(clock.monotonic())) == 1
    plan2.stop()  # the device woke
    clock.advance(10)
    assert plan2.due(clock.monotonic()) == [] and plan2.next_deadline() is None


def test_ringing_alerts_repeat_with_collapse_id_and_end_with_final_alert() -> None:
    s, clock = strategy("[push]\ntimeout = 0\ncall-remote-push-interval = 2\n")
    plan = s.plan(RequestKind.CALL, parse_push_params(IOS_REMOTE), CALLER)
    assert plan is not None
    sent = []
    for _ in range(7):
        sent += plan.due(clock.monotonic())
        clock.advance(1)
    assert [p.kind for p in sent] == [PushKind.RINGING] * 4  # at 0, 2, 4 and 6 s
    assert {p.collapse_id for p in sent} == {"call-1"}
    final = plan.finish(CallEndReason.DECLINED_ELSEWHERE)
    assert final is not None and final.kind is PushKind.CALL_ENDED
    assert final.end_reason is CallEndReason.DECLINED_ELSEWHERE
    assert final.collapse_id == "call-1"
    assert plan.finish(CallEndReason.MISSED) is None  # once
    assert plan.due(clock.monotonic() + 10) == []


def test_pn_call_remote_push_interval_and_single_ringing_alert() -> None:
    s, clock = strategy("[push]\ntimeout = 0\ncall-remote-push-interval = 2\n")
    once = s.plan(
        RequestKind.CALL,
        parse_push_params({**IOS_REMOTE, "pn-call-remote-push-interval": "0"}),
        CALLER,
    )
    assert once is not None
    sent = []
    for _ in range(5):
        sent += once.due(clock.monotonic())
        clock.advance(1)
    assert len(sent) == 1


def test_no_final_alert_without_ringing_or_for_voip() -> None:
    s, _ = strategy("[push]\ntimeout = 10\n")
    ringing = s.plan(RequestKind.CALL, parse_push_params(IOS_REMOTE), Caller("c1"))
    voip = s.plan(RequestKind.CALL, parse_push_params(IOS_BOTH), Caller("c2"))
    assert ringing is not None and voip is not None
    assert ringing.finish(CallEndReason.MISSED) is None  # never rang: nothing to replace
    assert voip.finish(CallEndReason.MISSED) is None


def test_one_plan_per_call_id_and_token() -> None:
    s, clock = strategy()
    params = parse_push_params(ANDROID)
    assert s.plan(RequestKind.CALL, params, CALLER) is not None
    assert s.plan(RequestKind.CALL, params, CALLER) is None
    assert s.plan(RequestKind.CALL, params, Caller("call-other")) is not None
    clock.advance(3600)  # long after the call, the pair is forgotten
    assert s.plan(RequestKind.CALL, params, CALLER) is not None


def parse(text: str) -> Request:
    msg = parse_message(text.replace("\n", "\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def req(method: str = "INVITE", extra: str = "", to_tag: str = "", body: str = "") -> Request:
    to = "<sip:bob@example.org>" + (f";tag={to_tag}" if to_tag else "")
    head = (
        f"{method} sip:bob@example.org SIP/2.0\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\n"
        "From: <sip:alice@example.org>;tag=a\n"
        f"To: {to}\nCall-ID: c\nCSeq: 1 {method}\nMax-Forwards: 70\n"
    )
    if extra:
        head += extra + "\n"
    return parse(
        head + f"Content-Length: {len(body.replace(chr(10), chr(13) + chr(10)))}\n\n" + body
    )


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (req(), None),
        (req("MESSAGE", "Content-Type: text/plain", body="hi"), None),
        (req(to_tag="x"), "in-dialog request"),
        (req(extra="Priority: non-urgent"), "Priority: non-urgent"),
        (req(extra="Priority: urgent"), None),
        (req(extra="Replaces: a;to-tag=b;from-tag=c"), "INVITE with Replaces"),
        (
            req("MESSAGE", "Content-Type: application/im-iscomposing+xml", body="<x/>"),
            "MESSAGE of type application/im-iscomposing+xml",
        ),
        (
            req("MESSAGE", "Content-Type: message/imdn+xml; charset=utf-8", body="<x/>"),
            "MESSAGE of type message/imdn+xml",
        ),
        (
            req(
                "MESSAGE",
                "Content-Type: message/cpim",
                body="From: <sip:a@b>\n\nContent-Type: message/imdn+xml\n\n<imdn/>",
            ),
            "MESSAGE carrying an IMDN",
        ),
        (
            req("MESSAGE", "Content-Type: message/cpim", body="Content-Type: text/plain\n\nhi"),
            None,
        ),
    ],
)
def test_requests_that_never_wake_a_device(request_: Request, reason: str | None) -> None:
    assert no_push_reason(request_) == reason


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, CallEndReason.MISSED),
        ('SIP;cause=200;text="Call completed elsewhere"', CallEndReason.ANSWERED_ELSEWHERE),
        ('SIP ;cause=603 ;text="Declined"', CallEndReason.DECLINED_ELSEWHERE),
        ("SIP;cause=600", CallEndReason.DECLINED_ELSEWHERE),
        ("Q.850;cause=16", CallEndReason.MISSED),
        ("SIP;cause=487", CallEndReason.MISSED),
    ],
)
def test_final_alert_reason_from_cancel(header: str | None, reason: CallEndReason) -> None:
    cancel = req("CANCEL", f"Reason: {header}" if header else "")
    assert end_reason_of(cancel) is reason
    assert end_reason_of(None) is CallEndReason.MISSED
