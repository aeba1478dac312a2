"""End to end: chat MESSAGEs to a sleeping app survive a restart and arrive once, in order.

`sipwake serve` runs as a process with the APNs simulator in this process; SIPp sends
the MESSAGEs and plays the device.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

from sipwake.config import load_config
from sipwake.simulator.apns import ApnsSimulator
from sipwake.store import open_store
from tests.conftest import free_port
from tests.e2e.test_call import (
    BUNDLE,
    DOMAIN,
    INSTANCE,
    REMOTE_TOKEN,
    Sipp,
    apns,
    apns_toml,
    ios_voip_params,
    pytestmark,
    register,
    sip_toml,
)

__all__ = ["apns", "pytestmark"]  # the fixture and the SIPp skip mark, shared


def received_messages(trace: Path) -> list[tuple[str, str, str]]:
    """(Call-ID, Via branch, body) of each MESSAGE request in a SIPp message trace."""
    out = []
    for block in re.split(r"\n(?=MESSAGE sip:)", "\n" + trace.read_text(errors="replace")):
        if not block.startswith("MESSAGE sip:"):
            continue
        call_id = re.search(r"(?mi)^Call-ID:\s*(\S+)", block)
        branch = re.search(r"(?mi)^Via:[^\n]*branch=([^;\s]+)", block)
        _, _, body = block.partition("\n\n")
        assert call_id and branch, block
        out.append((call_id.group(1), branch.group(1), body.strip().split("\n")[0].strip()))
    return out


async def test_message_to_sleeping_device_survives_restart_and_arrives_once_in_order(
    serve: Any, apns: ApnsSimulator, tmp_path: Path
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    extra = sip_toml(port) + apns_toml(apns)
    first = serve(extra, sip_port=port)
    await register(port, ios_voip_params(apns), INSTANCE)

    # Two MESSAGEs for the sleeping device: each answered 202 once stored, each pushed.
    sender = Sipp("uac_message.xml", port, "bob", "-key", "text", "hello")
    sender.args[sender.args.index("-m") + 1] = "2"
    await sender.run()
    async with asyncio.timeout(10):
        pushes = await apns.wait_for_pushes(2)
    for push in pushes:
        assert push.token == REMOTE_TOKEN and push.topic == BUNDLE
        assert push.push_type == "alert"  # a message is never a PushKit push
        assert push.payload["aps"]["alert"]["loc-key"] == "IM_MSG"

    # sipwake restarts before the device wakes.
    assert first.stop() == 0
    second = serve(extra, sip_port=port)

    # The device registers from a new port and takes the held MESSAGEs there.
    trace = tmp_path / "device-messages.log"
    new_port = await register(port, ios_voip_params(apns), INSTANCE)
    device = Sipp("uas_message.xml", port, "bob", "-trace_msg", "-message_file", str(trace))
    device.on_port(new_port).args[device.args.index("-m") + 1] = "2"
    await device.run()

    got = received_messages(trace)
    call_ids = list(dict.fromkeys(c for c, _, _ in got))
    assert len(call_ids) == 2
    # Exactly once: each MESSAGE came in one transaction (retransmissions share a branch).
    assert {c: {b for cc, b, _ in got if cc == c} for c in call_ids} == {
        c: {next(b for cc, b, _ in got if cc == c)} for c in call_ids
    }
    assert [next(t for cc, _, t in got if cc == c) for c in call_ids] == ["hello 1", "hello 2"]

    assert second.stop() == 0
    store = await open_store(load_config(second.config))
    try:
        assert await store.messages.count(f"sip:bob@{DOMAIN}") == 0  # delivered: forgotten
    finally:
        await store.close()


TABLET = "5f2b0c5e-0000-4000-8000-0000000ab1e7"


async def test_held_message_reaches_the_phone_and_the_tablet(
    serve: Any, apns: ApnsSimulator, tmp_path: Path
) -> None:
    """bob has a phone and a tablet, both asleep: each gets the held MESSAGE, once, when
    it wakes and registers; then the message is done (forgotten)."""
    port = free_port(socket.SOCK_DGRAM)
    server = serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    tablet_params = (
        f"pn-provider=apns.dev;pn-param={apns.team_id}.{BUNDLE}.voip%26remote;"
        f"pn-prid={'a1' * 32}:voip%26{'b1' * 32}:remote"
    )
    devices = {INSTANCE: ios_voip_params(apns), TABLET: tablet_params}
    for instance, params in devices.items():
        await register(port, params, instance)
    await Sipp("uac_message.xml", port, "bob", "-key", "text", "to both").run()
    async with asyncio.timeout(10):
        await apns.wait_for_pushes(2)  # one alert per device

    for n, (instance, params) in enumerate(devices.items()):
        trace = tmp_path / f"device-{n}.log"
        new_port = await register(port, params, instance)
        device = Sipp("uas_message.xml", port, "bob", "-trace_msg", "-message_file", str(trace))
        await device.on_port(new_port).run()
        assert [t for _, _, t in received_messages(trace)] == ["to both 1"]

    assert server.stop() == 0
    store = await open_store(load_config(server.config))
    try:
        assert await store.messages.count() == 0  # every device had it: done
    finally:
        await store.close()
