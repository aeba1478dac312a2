"""End to end: `sipwake serve` as registrar, driven by SIPp devices on 127.0.0.1.

Registration lifecycle with RFC 8599 parameters, digest authentication (MD5 through SIPp,
SHA-256 through a small client here: SIPp 3.6 only speaks MD5), the sixth push device
evicting the least recently registered, a token the push provider rejects being removed,
and the policy that makes sipwake no open relay.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sipwake.config import parse_config
from sipwake.proxy.auth import digest_response, parse_digest
from sipwake.server import Server
from sipwake.simulator.apns import ApnsSimulator
from sipwake.sip.message import Response, parse_message
from tests.conftest import free_port

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent.parent / "sipp"
DOMAIN = "sipwake.test"

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) is not installed")


def sipp_args(
    scenario: str, port: int, *extra: str, calls: int = 1, transport: str = "u1"
) -> list[str]:
    assert SIPP is not None
    kind = socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM
    return [
        SIPP,
        "-sf",
        str(SCENARIOS / scenario),
        f"127.0.0.1:{port}",
        "-t",
        transport,
        "-i",
        "127.0.0.1",
        "-p",
        str(free_port(kind)),
        "-m",
        str(calls),
        "-l",
        "1",
        "-key",
        "domain",
        DOMAIN,
        "-timeout",
        "20s",
        "-timeout_error",
        "-nostdin",
        *extra,
    ]


def run_sipp(
    scenario: str, port: int, *extra: str, calls: int = 1, transport: str = "u1"
) -> tuple[int, str]:
    """Run a bounded SIPp client (a device); returns its exit status and statistics."""
    proc = subprocess.run(
        sipp_args(scenario, port, *extra, calls=calls, transport=transport),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


async def run_sipp_async(scenario: str, port: int, *extra: str, calls: int = 1) -> tuple[int, str]:
    """Same, without blocking the loop that runs an in-process server."""
    proc = await asyncio.create_subprocess_exec(
        *sipp_args(scenario, port, *extra, calls=calls),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(errors="replace")


def successful(screen: str) -> int:
    match = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", screen)
    assert match, screen[-2000:]
    return int(match.group(1))


class SipClient:
    """A minimal UDP user agent for what SIPp cannot check (binding lists, SHA-256)."""

    def __init__(self, port: int) -> None:
        self.server = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.local = self.sock.getsockname()[1]
        self.n = 0

    def close(self) -> None:
        self.sock.close()

    def register(self, user: str, contact: str | None = None, auth: str = "") -> Response:
        self.n += 1
        lines = [
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.local};branch=z9hG4bK-py{self.n};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{DOMAIN}>;tag=py",
            f"To: <sip:{user}@{DOMAIN}>",
            f"Call-ID: py-{self.local}",
            f"CSeq: {self.n} REGISTER",
        ]
        if contact:
            lines.append(f"Contact: {contact}")
        if auth:
            lines.append(f"Authorization: {auth}")
        lines += ["Content-Length: 0", "", ""]
        self.sock.sendto("\r\n".join(lines).encode(), self.server)
        while True:
            data, _ = self.sock.recvfrom(65535)
            msg = parse_message(data)
            if isinstance(msg, Response) and msg.status >= 200:
                return msg


def contacts_of(response: Response) -> list[str]:
    return [c.uri.to_string() for c in response.contacts]


def toml(extra: str = "") -> str:
    """Extra config for the ``serve`` fixture, whose text ends inside ``[sip]``."""
    return f'domains = ["{DOMAIN}"]\n' + extra


# ----------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])
def test_push_device_registration_lifecycle(serve: Any, transport: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(toml(), sip_port=port)
    code, screen = run_sipp("register_lifecycle_uac.xml", port, "-s", "alice", transport=transport)
    assert code == 0, screen[-3000:]
    assert successful(screen) == 1
    client = SipClient(port)
    try:
        assert contacts_of(client.register("alice")) == []  # unregistered at the end
    finally:
        client.close()


def test_sixth_device_evicts_the_least_recently_registered(serve: Any, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(toml(), sip_port=port)
    devices = tmp_path / "devices.csv"
    rows = [f"{n:012d};fcm;my-project;token-{n}" for n in range(6)]
    devices.write_text("SEQUENTIAL\n" + "\n".join(rows) + "\n")
    code, screen = run_sipp(
        "register_device_uac.xml", port, "-s", "carol", "-inf", str(devices), calls=6
    )
    assert code == 0, screen[-3000:]
    assert successful(screen) == 6
    client = SipClient(port)
    try:
        users = sorted(c.split("@")[0] for c in contacts_of(client.register("carol")))
    finally:
        client.close()
    assert users == [f"sip:{n:012d}" for n in range(1, 6)]  # device 0 was evicted


def test_policy_no_open_relay(serve: Any) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(toml(), sip_port=port)
    code, screen = run_sipp("register_policy_uac.xml", port)
    assert code == 0, screen[-3000:]
    assert successful(screen) == 1


def test_a_phone_is_sent_its_requests_from_the_listener_it_registered_through(
    serve: Any,
) -> None:
    """With two UDP listeners, a MESSAGE for a phone that registered through the second
    must leave from the second: its NAT lets in only what comes from there."""
    port, second = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    serve(toml(), sip_port=port, more_listen=[f"udp://127.0.0.1:{second}"])
    phone = SipClient(second)
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        contact = f"<sip:erin@127.0.0.1:{phone.local}>;expires=600"
        assert phone.register("erin", contact).status == 200
        caller.bind(("127.0.0.1", 0))
        local = caller.getsockname()[1]
        caller.sendto(
            (
                f"MESSAGE sip:erin@{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-two1;rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:frank@{DOMAIN}>;tag=f1\r\n"
                f"To: <sip:erin@{DOMAIN}>\r\n"
                "Call-ID: two-listeners\r\nCSeq: 1 MESSAGE\r\n"
                "Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
            ).encode(),
            ("127.0.0.1", port),
        )
        data, source = phone.sock.recvfrom(65535)
        message = parse_message(data)
        assert message.call_id == "two-listeners" and not isinstance(message, Response)
        assert source == ("127.0.0.1", second)
    finally:
        caller.close()
        phone.close()


# ----------------------------------------------------------------------------- auth

AUTH = '[auth]\nenabled = true\nusers = { dave = "correct horse" }\n'


def test_unauthenticated_register_is_challenged_and_md5_password_works(serve: Any) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(toml(AUTH + 'algorithms = ["MD5"]\n'), sip_port=port)
    code, screen = run_sipp(
        "register_auth_uac.xml", port, "-s", "dave", "-au", "dave", "-ap", "correct horse"
    )
    assert code == 0, screen[-3000:]
    code, screen = run_sipp(
        "register_auth_refused_uac.xml", port, "-s", "dave", "-au", "dave", "-ap", "wrong"
    )
    assert code == 0, screen[-3000:]


def test_sha256_digest_register(serve: Any) -> None:
    port = free_port(socket.SOCK_DGRAM)
    serve(toml(AUTH), sip_port=port)
    client = SipClient(port)
    contact = f"<sip:dave@127.0.0.1:{client.local}>"
    try:
        challenge = client.register("dave", contact)
        assert challenge.status == 401
        offers = [parse_digest(v) for v in challenge.headers.get_all("www-authenticate")]
        assert [o["algorithm"] for o in offers if o] == ["SHA-256", "MD5"]
        p = offers[0]
        assert p is not None

        def creds(password: str) -> str:
            uri = f"sip:{DOMAIN}"
            digest = digest_response(
                "SHA-256", "dave", p["realm"], password, "REGISTER", uri, p["nonce"],
                "00000001", "c0ffee", "auth",
            )  # fmt: skip
            return (
                f'Digest username="dave", realm="{p["realm"]}", nonce="{p["nonce"]}", '
                f'uri="{uri}", response="{digest}", algorithm=SHA-256, qop=auth, '
                'nc=00000001, cnonce="c0ffee"'
            )

        assert client.register("dave", contact, creds("wrong")).status == 403
        ok = client.register("dave", contact, creds("correct horse"))
        assert ok.status == 200 and contacts_of(ok) == [f"sip:dave@127.0.0.1:{client.local}"]
    finally:
        client.close()


# ----------------------------------------------------------------------------- dead tokens

DEAD = "dead" * 16
ALIVE = "a1" * 32


async def test_token_rejected_by_the_provider_is_removed(tmp_path: Path) -> None:
    sim = ApnsSimulator(tmp_path / "sim", apps=("org.example.app",))
    await sim.start()
    sim.set_tokens(unregistered=[DEAD])
    port = free_port(socket.SOCK_DGRAM)
    config = parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "sip": {"listen": [f"udp://127.0.0.1:{port}"], "domains": [DOMAIN]},
            "http": {"listen": ""},
            "push": {
                "ca-file": str(sim.ca_file),
                "register-wakeup-interval": 1,
                "register-wakeup-threshold": 0,
                "apple": {
                    "server": sim.production_url,
                    "dev-server": sim.sandbox_url,
                    "key-file": str(sim.key_file),
                    "key-id": sim.key_id,
                    "team-id": sim.team_id,
                },
            },
        }
    )
    server = Server(config)
    await server.start()
    try:
        devices = tmp_path / "devices.csv"
        param = f"{sim.team_id}.org.example.app"
        devices.write_text(
            f"SEQUENTIAL\n000000000001;apns.dev;{param};{DEAD}\n"
            f"000000000002;apns.dev;{param};{ALIVE}\n"
        )
        code, screen = await run_sipp_async(
            "register_device_uac.xml", port, "-s", "erin", "-inf", str(devices), calls=2
        )
        assert code == 0, screen[-3000:]
        assert server.registrar is not None
        # The wake-up timer's work, run now instead of after a minute.
        results = await server.registrar.send_wakeups()
        assert sorted(r.outcome.value for r in results) == ["sent", "token-rejected"]
        await server.registrar.aclose()  # the removal started by the rejection is done
        left = await server.registrar.lookup(f"sip:erin@{DOMAIN}")
        assert [b.push_tokens for b in left] == [("apns.dev", (ALIVE,))]
        assert server.registrar.stats["dead_tokens"] == 1
        (push,) = [p for p in sim.received if p.token == ALIVE]
        assert push.push_type == "background"
    finally:
        await server.stop()
        await sim.stop()


async def test_token_rejected_on_a_call_push_is_removed(serve: Any, tmp_path: Path) -> None:
    """The router's push for a call goes to a dead VoIP token: the binding is gone after."""
    sim = ApnsSimulator(tmp_path / "sim", apps=("org.example.app",))
    await sim.start()
    try:
        sim.set_tokens(unregistered=[DEAD])
        port = free_port(socket.SOCK_DGRAM)
        serve(
            toml(
                "t1 = 100\n[router]\ncall-fork-timeout = 2\n"
                f'[push]\ntimeout = 0\nca-file = "{sim.ca_file}"\n'
                f'[push.apple]\nkey-file = "{sim.key_file}"\nkey-id = "{sim.key_id}"\n'
                f'team-id = "{sim.team_id}"\nserver = "{sim.production_url}"\n'
                f'dev-server = "{sim.sandbox_url}"\n[push.firebase]\nenabled = false\n'
            ),
            sip_port=port,
        )
        devices = tmp_path / "devices.csv"
        param = f"{sim.team_id}.org.example.app.voip%26remote"
        devices.write_text(
            f"SEQUENTIAL\n000000000001;apns.dev;{param};{DEAD}:voip%26{ALIVE}:remote\n"
        )
        code, screen = await run_sipp_async(
            "register_device_uac.xml", port, "-s", "frank", "-inf", str(devices)
        )
        assert code == 0, screen[-3000:]
        code, screen = await run_sipp_async(
            "register_dead_token_caller_uac.xml", port, "-s", "frank"
        )
        assert code == 0, screen[-3000:]
        assert [(p.token, p.push_type) for p in sim.received] == []  # refused, not delivered
        client = SipClient(port)
        try:
            assert contacts_of(client.register("frank")) == []
        finally:
            client.close()
    finally:
        await sim.stop()


async def test_latin1_user_agent_and_display_name_register_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    """A phone that writes its User-Agent, Contact display name and Call-ID in Latin-1 (not
    UTF-8) registers, gets its Contact back byte for byte, and the binding is read back from
    the database by the next server; so is one whose AOR has an escaped Latin-1 byte."""
    port = free_port(socket.SOCK_DGRAM)
    config = parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "sip": {"listen": [f"udp://127.0.0.1:{port}"], "domains": [DOMAIN]},
            "http": {"listen": ""},
        }
    )
    contact = b'"Ren\xe9" <sip:rene@127.0.0.1:5099;transport=udp>'
    request = b"\r\n".join(
        [
            f"REGISTER sip:{DOMAIN} SIP/2.0".encode(),
            b"Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-latin1;rport",
            b"Max-Forwards: 70",
            f"From: <sip:rene@{DOMAIN}>;tag=l1".encode(),
            f"To: <sip:rene@{DOMAIN}>".encode(),
            b"Call-ID: latin1-\xe9",
            b"CSeq: 1 REGISTER",
            b"User-Agent: T\xe9l\xe9phone 1.0",
            b"Contact: " + contact,
            b"Expires: 3600",
            b"Content-Length: 0",
            b"",
            b"",
        ]
    )
    aor = f"sip:rene@{DOMAIN}"
    server = Server(config)
    await server.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(sock, request, ("127.0.0.1", port))
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 10)
        assert data.startswith(b"SIP/2.0 200 "), data[:200]
        assert b"Contact: " + contact + b";expires=" in data  # echoed as sent
        escaped = (
            request.replace(b"To: <sip:rene@", b"To: <sip:ren%E9@")
            .replace(b"latin1-\xe9", b"latin1-2")
            .replace(b"z9hG4bK-latin1", b"z9hG4bK-latin2")
        )
        await loop.sock_sendto(sock, escaped, ("127.0.0.1", port))
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 10)
        assert data.startswith(b"SIP/2.0 200 "), data[:200]
    finally:
        sock.close()
        await server.stop()

    server = Server(config)  # a restart: the binding is read back from SQLite
    await server.start()
    try:
        assert server.registrar is not None
        (binding,) = await server.registrar.lookup(aor)
        assert binding.user_agent.encode("utf-8", "surrogateescape") == b"T\xe9l\xe9phone 1.0"
        assert binding.contact_header.encode("utf-8", "surrogateescape") == contact
        assert binding.contact == "sip:rene@127.0.0.1:5099;transport=udp"
        assert binding.call_id.encode("utf-8", "surrogateescape") == b"latin1-\xe9"
        latin1 = b"\xe9".decode("utf-8", "surrogateescape")
        (other,) = await server.registrar.lookup(f"sip:ren{latin1}@{DOMAIN}")
        assert other.call_id == "latin1-2"
    finally:
        await server.stop()
