"""End to end: calls to sleeping apps through `sipwake serve`, SIPp devices and simulators.

Each test runs `sipwake serve` as a process, the APNs or FCM simulator in this process as
its push upstream, and SIPp for the callee and the caller (separate processes on
127.0.0.1). A callee "goes silent" when its SIPp process ends after registering; it
"wakes" when it registers again from a new port. An app woken to answer is one UDP
socket (:class:`WokenApp`): sipwake answers its REGISTER before it forwards the held
INVITE, so it gets its 200 OK and then the INVITE, with no retransmission needed. An app
woken after a CANCEL registers with SIPp and a second SIPp process takes over its port;
the proxy's INVITE retransmissions cover the moment between the two.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sipwake.simulator.apns import ApnsSimulator
from sipwake.simulator.fcm import FcmSimulator
from sipwake.simulator.tls import Pki
from sipwake.sip.message import Request, Response, make_response, parse_message
from tests.conftest import free_port

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent.parent / "sipp"
DOMAIN = "sipwake.test"
BUNDLE = "org.example.app"
VOIP_TOKEN = "a0" * 32
REMOTE_TOKEN = "b0" * 32
FCM_TOKEN = "fcm-device-token-0001"
PROJECT = "sipwake-e2e"

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) is not installed")


class Sipp:
    """One SIPp process (a device or a caller) on its own port, run in the background."""

    def __init__(self, scenario: str, server_port: int, user: str, *extra: str) -> None:
        self.port = free_port(socket.SOCK_DGRAM)
        self.args = [
            SIPP or "sipp", "-sf", str(SCENARIOS / scenario), f"127.0.0.1:{server_port}",
            "-t", "u1", "-i", "127.0.0.1", "-p", str(self.port), "-m", "1", "-l", "1",
            "-s", user, "-key", "domain", DOMAIN, "-timeout", "20s", "-timeout_error",
            "-nostdin", "-cid_str", "e2e-%u-%p@%s", *extra,
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    def on_port(self, port: int) -> Sipp:
        self.port = port
        self.args[self.args.index("-p") + 1] = str(port)
        return self

    async def start(self) -> Sipp:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        return self

    async def finish(self) -> str:
        """Wait for the scenario's end; fails with SIPp's screen unless it succeeded."""
        assert self.proc is not None
        async with asyncio.timeout(30):  # SIPp's own -timeout is 20 s
            out, _ = await self.proc.communicate()
        screen = out.decode(errors="replace")
        assert self.proc.returncode == 0, screen[-3000:]
        match = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", screen)
        assert match and int(match.group(1)) >= 1, screen[-3000:]
        return screen

    async def run(self) -> str:
        await self.start()
        return await self.finish()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


class Recorded(list[dict[str, Any]]):
    """The FCM simulator's record of messages, telling when one arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.added = asyncio.Event()

    def append(self, item: dict[str, Any]) -> None:
        super().append(item)
        self.added.set()


@pytest.fixture
async def apns(tmp_path: Path) -> AsyncIterator[ApnsSimulator]:
    sim = ApnsSimulator(tmp_path / "apns", apps=(BUNDLE,))
    await sim.start()
    yield sim
    await sim.stop()


def sip_toml(port: int, extra_router: str = "") -> str:
    """Config after the ``serve`` fixture's [sip] header: short timers for tests."""
    return (
        f'domains = ["{DOMAIN}"]\nt1 = 100\n'
        f"[router]\ncall-fork-timeout = 8\nmessage-accept-timeout = 1\n{extra_router}"
    )


def apns_toml(sim: ApnsSimulator, push_extra: str = "") -> str:
    return (
        f'[push]\ntimeout = 0\nca-file = "{sim.ca_file}"\n{push_extra}'
        f'[push.apple]\nkey-file = "{sim.key_file}"\nkey-id = "{sim.key_id}"\n'
        f'team-id = "{sim.team_id}"\nserver = "{sim.production_url}"\n'
        f'dev-server = "{sim.sandbox_url}"\n'
        "[push.firebase]\nenabled = false\n"
    )


def ios_voip_params(sim: ApnsSimulator) -> str:
    return (
        f"pn-provider=apns.dev;pn-param={sim.team_id}.{BUNDLE}.voip%26remote;"
        f"pn-prid={VOIP_TOKEN}:voip%26{REMOTE_TOKEN}:remote"
    )


def ios_remote_params(sim: ApnsSimulator) -> str:
    return f"pn-provider=apns.dev;pn-param={sim.team_id}.{BUNDLE};pn-prid={REMOTE_TOKEN}"


async def register(port: int, params: str, instance: str, on_port: int | None = None) -> int:
    """A device registers (and its SIPp process ends: the app goes to sleep)."""
    sipp = Sipp("uac_register_push.xml", port, "bob", "-key", "pn", params, "-key",
                "instance", instance)  # fmt: skip
    if on_port is not None:
        sipp.on_port(on_port)
    await sipp.run()
    return sipp.port


class WokenApp:
    """The woken app on one UDP socket: it registers from a new port and answers the held
    call there. sipwake answers the REGISTER before it forwards the held INVITE, so the
    first thing the app receives is its 200 OK (no INVITE retransmission is needed)."""

    def __init__(self, server_port: int) -> None:
        self.server = ("127.0.0.1", server_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(15)
        self.port = self.sock.getsockname()[1]
        #: Method or status of each message received, in order.
        self.received: list[str | int] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self) -> Request | Response:
        data, _ = self.sock.recvfrom(65535)
        msg = parse_message(data)
        assert isinstance(msg, Request | Response)
        self.received.append(msg.method if isinstance(msg, Request) else msg.status)
        return msg

    def _reply(self, request: Request, status: int) -> None:
        response = make_response(request, status, to_tag="woken")
        for value in request.headers.get_all("record-route"):
            response.headers.add("Record-Route", value)
        response.headers.add("Contact", f"<sip:bob@127.0.0.1:{self.port}>")
        self.sock.sendto(response.to_bytes(), self.server)

    def register_and_answer(self, params: str, instance: str) -> None:
        lines = [
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-woken{self.port};rport",
            "Max-Forwards: 70",
            f"From: <sip:bob@{DOMAIN}>;tag=woken",
            f"To: <sip:bob@{DOMAIN}>",
            f"Call-ID: woken-{self.port}",
            "CSeq: 1 REGISTER",
            f"Contact: <sip:bob@127.0.0.1:{self.port};transport=udp;{params}>"
            f';+sip.instance="<urn:uuid:{instance}>"',
            "Expires: 3600",
            "Content-Length: 0",
            "",
            "",
        ]
        self.sock.sendto("\r\n".join(lines).encode(), self.server)
        first = self._receive()
        assert isinstance(first, Response), f"{first.method} before the REGISTER's 200 OK"
        assert first.status == 200 and first.cseq is not None
        assert first.cseq.method == "REGISTER"
        invite = self._receive()
        assert isinstance(invite, Request) and invite.method == "INVITE"
        self._reply(invite, 180)
        self._reply(invite, 200)
        while True:  # the caller's ACK, then its BYE
            msg = self._receive()
            if isinstance(msg, Request) and msg.method == "BYE":
                self._reply(msg, 200)
                return


async def wake_and_answer(port: int, params: str, instance: str, caller: Sipp) -> None:
    """The woken app registers from a new port and answers the call there."""
    app = WokenApp(port)
    try:
        answering = asyncio.create_task(
            asyncio.to_thread(app.register_and_answer, params, instance)
        )
        await answering
        await caller.finish()
    finally:
        app.close()
    assert app.received[:2] == [200, "INVITE"], app.received


INSTANCE = "5f2b0c5e-0000-4000-8000-00000000b0b0"


async def test_ios_voip_callee_is_woken_by_pushkit_and_answers(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    await register(port, ios_voip_params(apns), INSTANCE)

    caller = await Sipp("uac_call.xml", port, "bob").start()
    try:
        async with asyncio.timeout(10):
            (push,) = await apns.wait_for_pushes(1)
        assert push.environment == "development"
        assert push.token == VOIP_TOKEN
        assert push.topic == f"{BUNDLE}.voip" and push.push_type == "voip"
        assert push.priority == 10
        call_id = push.payload["aps"]["call-id"]
        assert call_id.startswith("e2e-") and push.payload["call-id"] == call_id
        assert push.payload["aps"]["loc-key"] == "IC_MSG"

        await wake_and_answer(port, ios_voip_params(apns), INSTANCE, caller)
    finally:
        caller.kill()
    assert len(apns.received) == 1  # one push for the call, none after the device woke


async def test_android_fcm_callee_gets_a_data_push_and_answers(serve: Any, tmp_path: Path) -> None:
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
        params = f"pn-provider=fcm;pn-param={PROJECT};pn-prid={FCM_TOKEN}"
        await register(port, params, INSTANCE)
        caller = await Sipp("uac_call.xml", port, "bob").start()
        try:
            async with asyncio.timeout(10):
                await recorded.added.wait()
            (message,) = sim.messages
            assert message["project"] == PROJECT
            android = message["android"]
            assert message["token"] == FCM_TOKEN
            assert android["priority"] == "high" and android["ttl"] == "8s"
            assert android["data"]["call-id"].startswith("e2e-")
            await wake_and_answer(port, params, INSTANCE, caller)
        finally:
            caller.kill()
        assert len(sim.messages) == 1
    finally:
        await sim.aclose()


async def test_ios_remote_only_callee_rings_then_gets_a_missed_call_alert(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns, "call-remote-push-interval = 1\n"), sip_port=port)
    await register(port, ios_remote_params(apns), INSTANCE)

    # The caller gives up 2.5 s after the 110: two or three ringing alerts went out.
    caller = await Sipp("uac_call_cancel.xml", port, "bob", "-d", "2500").start()
    try:
        await caller.finish()
        async with asyncio.timeout(10):
            while not any(p.payload["aps"].get("alert", {}).get("loc-key") == "IC_MISSED"
                          for p in apns.received):  # fmt: skip
                await apns.wait_for_pushes(len(apns.received) + 1)
    finally:
        caller.kill()
    pushes = list(apns.received)
    *ringing, final = pushes
    assert len(ringing) >= 2
    for p in pushes:
        assert p.token == REMOTE_TOKEN and p.push_type == "alert" and p.topic == BUNDLE
    call_id = ringing[0].payload["call-id"]
    assert {p.collapse_id for p in pushes} == {call_id}  # the final alert replaces them
    assert all(p.payload["aps"]["alert"]["loc-key"] == "IC_MSG" for p in ringing)
    assert final.payload["aps"]["alert"]["loc-key"] == "IC_MISSED"


async def test_unanswered_call_is_480_after_call_fork_timeout(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port).replace("call-fork-timeout = 8", "call-fork-timeout = 2")
          + apns_toml(apns), sip_port=port)  # fmt: skip
    await register(port, ios_voip_params(apns), INSTANCE)
    await Sipp("uac_call_unanswered.xml", port, "bob").run()
    assert [p.push_type for p in apns.received] == ["voip"]


async def test_ios_voip_callee_waking_after_cancel_gets_the_invite_then_its_cancel(
    serve: Any, apns: ApnsSimulator
) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_toml(port) + apns_toml(apns), sip_port=port)
    await register(port, ios_voip_params(apns), INSTANCE)
    # The caller gives up 0.5 s after the 110 (the PushKit push went out).
    await Sipp("uac_call_cancel.xml", port, "bob", "-d", "500").run()
    assert [p.push_type for p in apns.received] == ["voip"]
    # The app, woken by PushKit, registers: iOS wants it to report a call, so it gets one,
    # and the CANCEL that makes it a missed call.
    new_port = await register(port, ios_voip_params(apns), INSTANCE)
    await Sipp("uas_cancelled.xml", port, "bob").on_port(new_port).run()
