"""End to end: what the pushes of the push-aware proxy say, as the APNs simulator got them.

`sipwake serve` runs as a process, the APNs simulator in this process, SIPp plays the
callers and the devices (see :mod:`tests.e2e.test_call`).
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from sipwake.simulator.apns import ApnsPush, ApnsSimulator
from sipwake.simulator.external import ExternalReceiver
from sipwake.simulator.fcm import FcmSimulator
from sipwake.simulator.tls import Pki
from tests.conftest import free_port
from tests.e2e.test_call import (
    BUNDLE,
    DOMAIN,
    FCM_TOKEN,
    INSTANCE,
    PROJECT,
    REMOTE_TOKEN,
    VOIP_TOKEN,
    Recorded,
    Sipp,
    apns,
    apns_toml,
    ios_remote_params,
    ios_voip_params,
    pytestmark,
    register,
    sip_toml,
)

__all__ = ["apns", "pytestmark"]  # the fixture and the SIPp skip mark, shared

MESSAGE_TTL = 604800  # [router] message-delivery-timeout's default


def variable(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with the per-push values (uuid, send time, Call-ID) checked and
    replaced by placeholders, so the rest compares exactly."""
    out = dict(payload)
    for key in ("uuid", "send-time", "call-id"):
        assert isinstance(out[key], str) and out[key], key
        out[key] = f"<{key}>"
    return out


async def wait_until(sim: ApnsSimulator, done: Any) -> list[ApnsPush]:
    """The simulator's pushes once ``done(pushes)`` holds (10 s at most)."""
    async with asyncio.timeout(10):
        while not done(list(sim.received)):
            await sim.wait_for_pushes(len(sim.received) + 1)
    return list(sim.received)


async def test_message_alert_is_mutable_with_an_empty_chat_room(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    await register(port, ios_voip_params(apns), INSTANCE)
    await Sipp("uac_message.xml", port, "bob", "-key", "text", "hello").run()
    (push,) = await wait_until(apns, lambda p: len(p) >= 1)
    assert (push.token, push.topic, push.push_type) == (REMOTE_TOKEN, BUNDLE, "alert")
    assert variable(push.payload) == {
        "aps": {
            "alert": {"loc-key": "IM_MSG", "loc-args": [""]},
            "sound": "default",
            "badge": 1,
            "mutable-content": 1,  # the notification service extension fetches the text
        },
        "from-uri": "",
        "display-name": "",
        "call-id": "<call-id>",
        "pn_ttl": MESSAGE_TTL,
        "uuid": "<uuid>",
        "send-time": "<send-time>",
        "chat-room-addr": "",  # a message, not a chat-room invitation
        "customPayload": {},
    }
    assert push.payload["call-id"].startswith("e2e-")


async def test_group_chat_invitation_is_a_gc_msg_alert_with_the_chat_room(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    await register(port, ios_voip_params(apns), INSTANCE)
    await Sipp("uac_groupchat_invite_cancel.xml", port, "bob", "-d", "300").run()
    pushes = await wait_until(apns, lambda p: len(p) >= 1)
    (push,) = pushes  # one alert; never PushKit (iOS would want a call reported)
    assert (push.token, push.topic, push.push_type) == (REMOTE_TOKEN, BUNDLE, "alert")
    assert variable(push.payload) == {
        "aps": {
            "alert": {"loc-key": "GC_MSG", "loc-args": [""]},
            "sound": "default",
            "badge": 1,
            "mutable-content": 1,
        },
        "from-uri": "",
        "display-name": "",
        "call-id": "<call-id>",
        "pn_ttl": MESSAGE_TTL,
        "uuid": "<uuid>",
        "send-time": "<send-time>",
        "chat-room-addr": "chatroom-e2e1",  # the conference address's user part
        "customPayload": {},
    }


async def test_missed_call_alert_uses_the_device_text_and_keeps_uuid_and_collapse_id(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns, "call-remote-push-interval = 1\n"), sip_port=port)
    params = ios_remote_params(apns) + ";pn-missing-call-str=MISSED_CALL_TEXT"
    await register(port, params, INSTANCE)
    await Sipp("uac_call_cancel.xml", port, "bob", "-d", "1500").run()

    def ended(p: list[ApnsPush]) -> bool:
        return any(x.payload["aps"]["alert"]["loc-key"] != "IC_MSG" for x in p)

    *ringing, final = await wait_until(apns, ended)
    assert ringing and all(p.payload["aps"]["alert"]["loc-key"] == "IC_MSG" for p in ringing)
    assert final.payload["aps"] == {
        "alert": {"loc-key": "MISSED_CALL_TEXT", "loc-args": [""]},
        "badge": 1,
    }
    everything = [*ringing, final]
    call_id = ringing[0].payload["call-id"]
    assert {p.collapse_id for p in everything} == {call_id}  # the final alert replaces them
    assert len({p.payload["uuid"] for p in everything}) == 1  # one call, one device
    assert len({p.apns_id for p in everything}) == len(everything)  # distinct notifications


def received_to_tags(message_log: Path) -> dict[int, str | None]:
    """Status → To tag of the responses in a SIPp ``-trace_msg`` log (the last of each)."""
    tags: dict[int, str | None] = {}
    for block in message_log.read_text().split("-----------------------------------------------"):
        head, _, message = block.partition("\n\n")
        status = re.match(r"SIP/2\.0 (\d{3}) ", message)
        if "message received" not in head or status is None:
            continue
        to = re.search(r"^(?:To|t):(.*)$", message, re.MULTILINE | re.IGNORECASE)
        tag = re.search(r";\s*tag=([^;>\s]+)", to[1]) if to else None
        tags[int(status[1])] = tag[1] if tag else None
    return tags


async def test_pn_silent_zero_gives_the_caller_ringback_and_one_gives_none(
    serve: Any, apns: ApnsSimulator, tmp_path: Path
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    # pn-silent=0: 110 Push sent, then 180 Ringing (the scenario requires both, in order).
    await register(port, ios_voip_params(apns) + ";pn-silent=0", INSTANCE)
    log = tmp_path / "ringback.log"
    trace = ("-trace_msg", "-message_file", str(log))
    await Sipp("uac_call_ringback_cancel.xml", port, "bob", "-d", "300", *trace).run()
    # The 180 has a To tag (a UA makes the early dialog from it), and the 110 and the 487
    # we answer after the CANCEL carry the same one: one early dialog, ended.
    tags = received_to_tags(log)
    assert {tags[110], tags[180], tags[487]} == {tags[180]} and tags[180]
    # pn-silent=1, what Linphone sends: 110 only; a 180 would abort this scenario.
    await register(port, ios_voip_params(apns) + ";pn-silent=1", INSTANCE)
    await Sipp("uac_call_cancel.xml", port, "bob", "-d", "300").run()
    assert [p.push_type for p in apns.received] == ["voip", "voip"]


async def test_pushkit_retransmissions_keep_the_call_uuid(serve: Any, apns: ApnsSimulator) -> None:
    port = free_port(socket.SOCK_DGRAM)
    config = sip_toml(port).replace("call-fork-timeout = 8", "call-fork-timeout = 5")
    serve(
        config + apns_toml(apns, "retransmission-count = 2\nretransmission-interval = 1\n"),
        sip_port=port,
    )
    await register(port, ios_voip_params(apns), INSTANCE)
    await Sipp("uac_call_unanswered.xml", port, "bob").run()  # 480 after 5 s
    pushes = list(apns.received)
    assert [(p.push_type, p.token) for p in pushes] == [("voip", VOIP_TOKEN)] * 3
    uuids = {p.payload["uuid"] for p in pushes} | {p.payload["aps"]["uuid"] for p in pushes}
    assert len(uuids) == 1  # CallKit keyed by uuid sees one call
    assert len({p.apns_id for p in pushes}) == 3
    assert len({p.payload["call-id"] for p in pushes}) == 1


async def test_android_group_chat_invitation_data_push(serve: Any, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure()
    sim = await FcmSimulator().start(pki=pki, http2=True)
    try:
        recorded = Recorded()
        sim.messages = recorded
        account = tmp_path / "fcm.json"
        sim.create_service_account(PROJECT, account)
        port = free_port(socket.SOCK_DGRAM)
        serve(
            sip_toml(port)
            + f'[push]\ntimeout = 0\nca-file = "{pki.ca_file}"\n'
            + "[push.apple]\nenabled = false\n"
            + f'[push.firebase]\nserver = "{sim.h2_url}"\n'
            + f'service-accounts = {{ "{PROJECT}" = "{account}" }}\n',
            sip_port=port,
        )
        params = f"pn-provider=fcm;pn-param={PROJECT};pn-prid={FCM_TOKEN};pn-groupchat-str=GC_KEY"
        await register(port, params, INSTANCE)
        await Sipp("uac_groupchat_invite_cancel.xml", port, "bob", "-d", "300").run()
        async with asyncio.timeout(10):
            while not sim.messages:
                recorded.added.clear()
                await recorded.added.wait()
        (message,) = sim.messages
        assert message["token"] == FCM_TOKEN
        android = message["android"]
        assert android["priority"] == "high" and android["ttl"] == f"{MESSAGE_TTL}s"
        assert variable(android["data"]) == {
            "uuid": "<uuid>",
            "from-uri": "",
            "display-name": "",
            "call-id": "<call-id>",
            "sip-from": "",
            "loc-key": "GC_KEY",  # the device's pn-groupchat-str
            "loc-args": "",
            "send-time": "<send-time>",
            "custom-payload": "{}",
            "chat-room-addr": "chatroom-e2e1",
        }
    finally:
        await sim.aclose()


@pytest.mark.parametrize("shown", [False, True])
async def test_external_pusher_gets_the_caller_only_with_display_from_uri(
    serve: Any, shown: bool
) -> None:
    """The operator's own pusher gets a call's push like Apple and Google would: without
    the caller's name and URI unless ``[push] display-from-uri`` allows them out."""
    receiver = await ExternalReceiver().start()
    try:
        port = free_port(socket.SOCK_DGRAM)
        template = "/push?name=$from-name&from=$from-uri&event=$event&token=$token"
        serve(
            sip_toml(port)
            + f"[push]\ntimeout = 0\ndisplay-from-uri = {str(shown).lower()}\n"
            + f'[push.external]\nuri = "{receiver.url}{template}"\nprotocol = "http"\n',
            sip_port=port,
        )
        params = f"pn-provider=fcm;pn-param={PROJECT};pn-prid={FCM_TOKEN}"
        await register(port, params, INSTANCE)
        await Sipp("uac_call_cancel.xml", port, "bob", "-d", "300").run()
        async with asyncio.timeout(10):
            while not receiver.received:
                receiver.arrived.clear()
                await receiver.arrived.wait()
        got = receiver.received[0]
        q = {k: v[0] for k, v in got.query.items()}
        assert (q["event"], q["token"]) == ("call", FCM_TOKEN)
        if shown:
            assert (q["name"], q["from"]) == ("Alice", f"sip:alice@{DOMAIN}")
        else:
            assert (q["name"], q["from"]) == ("", "")
            assert "alice" not in got.path.lower()
    finally:
        await receiver.aclose()
