"""Two sipwake nodes on one Redis: a call held on node A completes when the callee
re-registers through node B (fork-late across the cluster)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sipwake.config import Config, parse_config
from sipwake.server import Server
from sipwake.simulator.apns import ApnsSimulator
from sipwake.sip.message import Request, Response, make_response, parse_message
from tests.conftest import free_port, wait_http_ok
from tests.store.redis_server import RedisServer

DOMAIN = "sipwake.test"
TOKEN = "c0ffee00" * 8


class Phone:
    """One UDP socket of a SIP device (or caller), read with a timeout, never a sleep."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(15)
        self.port = self.sock.getsockname()[1]
        self.n = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, text: str, port: int) -> None:
        self.sock.sendto(text.encode(), ("127.0.0.1", port))

    def receive(self) -> Request | Response:
        data, _ = self.sock.recvfrom(65535)
        msg = parse_message(data)
        assert isinstance(msg, Request | Response)
        return msg

    def final(self, method: str) -> Response:
        """The next final response to ``method`` (provisional ones skipped)."""
        while True:
            msg = self.receive()
            final = isinstance(msg, Response) and msg.status >= 200
            if final and msg.cseq is not None and msg.cseq.method == method:
                assert isinstance(msg, Response)
                return msg

    def request_from(self, method: str) -> tuple[Request, int]:
        """The next ``method`` request and the port of the node that sent it."""
        while True:
            data, (_, port) = self.sock.recvfrom(65535)
            msg = parse_message(data)
            if isinstance(msg, Request) and msg.method == method:
                return msg, port

    def provisional(self, status: int) -> Response:
        while True:
            msg = self.receive()
            if isinstance(msg, Response) and msg.status == status:
                return msg

    def request(self, method: str) -> Request:
        while True:
            msg = self.receive()
            if isinstance(msg, Request) and msg.method == method:
                return msg

    def message(self, node: int, text: str) -> Response:
        """Alice sends ``text`` to bob through ``node``; returns the final answer."""
        self.n += 1
        self.send(
            "\r\n".join(
                [
                    f"MESSAGE sip:bob@{DOMAIN} SIP/2.0",
                    f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-m{self.n}{self.port}",
                    "Max-Forwards: 70",
                    f"From: <sip:alice@{DOMAIN}>;tag=m{self.port}",
                    f"To: <sip:bob@{DOMAIN}>",
                    f"Call-ID: msg-{self.n}-{self.port}",
                    f"CSeq: {self.n} MESSAGE",
                    "Content-Type: text/plain",
                    f"Content-Length: {len(text.encode())}",
                    "",
                    text,
                ]
            ),
            node,
        )
        return self.final("MESSAGE")

    def register(self, node: int, param: str, user: str = "bob") -> Response:
        self.n += 1
        contact = (
            f"<sip:{user}@127.0.0.1:{self.port};pn-provider=apns.dev;pn-prid={TOKEN};"
            f"pn-param={param}>"
        )
        self.send(
            "\r\n".join(
                [
                    f"REGISTER sip:{DOMAIN} SIP/2.0",
                    f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK-r{self.n}{self.port}",
                    "Max-Forwards: 70",
                    f"From: <sip:{user}@{DOMAIN}>;tag=r{self.port}",
                    f"To: <sip:{user}@{DOMAIN}>",
                    f"Call-ID: reg-{self.port}",
                    f"CSeq: {self.n} REGISTER",
                    f"Contact: {contact}",
                    "Expires: 600",
                    "Content-Length: 0",
                    "",
                    "",
                ]
            ),
            node,
        )
        return self.final("REGISTER")


def invite(caller: Phone) -> str:
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    return "\r\n".join(
        [
            f"INVITE sip:bob@{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{caller.port};branch=z9hG4bK-inv-cluster",
            "Max-Forwards: 70",
            f"From: <sip:alice@{DOMAIN}>;tag=alice1",
            f"To: <sip:bob@{DOMAIN}>",
            "Call-ID: cluster-call-1",
            "CSeq: 1 INVITE",
            f"Contact: <sip:alice@127.0.0.1:{caller.port}>",
            "Content-Type: application/sdp",
            f"Content-Length: {len(sdp)}",
            "",
            sdp,
        ]
    )


async def test_call_held_on_node_a_completes_when_callee_registers_via_node_b(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    sim = ApnsSimulator(tmp_path / "sim", apps=("org.example.phone",))
    await sim.start()
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    nodes = [Server(node_config(tmp_path, port, own_redis, sim)) for port in ports]
    for node in nodes:
        await node.start()
    node_a, node_b = ports
    asleep, awake, caller = Phone(), Phone(), Phone()
    param = f"{sim.team_id}.org.example.phone.voip"
    try:
        # The phone registered through node A, then its app was suspended.
        ok = await asyncio.to_thread(asleep.register, node_a, param)
        assert ok.status == 200
        await asyncio.to_thread(caller.send, invite(caller), node_a)
        # Node A forks to the sleeping contact (no answer) and pushes: the call is held.
        pushed = await asyncio.to_thread(caller.provisional, 110)
        assert pushed.reason == "Push sent"
        assert [p.token for p in sim.received] == [TOKEN]
        # The woken app registers through node B (another contact, the same token).
        ok = await asyncio.to_thread(awake.register, node_b, param)
        assert ok.status == 200
        assert [(c.uri.host, c.uri.port) for c in ok.contacts] == [("127.0.0.1", awake.port)]
        # Node A learns it through Redis and rings the new contact.
        msg = await asyncio.to_thread(awake.request, "INVITE")
        assert msg.call_id == "cluster-call-1"
        answer = make_response(msg, 200, "OK", to_tag="bob1")
        answer.headers.add("Contact", f"<sip:bob@127.0.0.1:{awake.port}>")
        await asyncio.to_thread(awake.sock.sendto, answer.to_bytes(), ("127.0.0.1", node_a))
        final = await asyncio.to_thread(caller.final, "INVITE")
        assert final.status == 200
        assert final.to is not None and final.to.tag == "bob1"
        assert nodes[0].router is not None and nodes[0].router.stats["late_forks"] == 1
    finally:
        for phone in (asleep, awake, caller):
            phone.close()
        for node in nodes:
            await node.stop()
        await sim.stop()


def node_config(
    tmp_path: Path, port: int, own_redis: RedisServer, sim: ApnsSimulator, **router: int
) -> Config:
    """One node: its own SIP port, the shared Redis, the data dir (secret key) shared."""
    return parse_config(
        {
            "server": {"data-dir": str(tmp_path / "data")},
            "router": {k.replace("_", "-"): v for k, v in router.items()},
            "sip": {"listen": [f"udp://127.0.0.1:{port}"], "domains": [DOMAIN]},
            "http": {"listen": ""},
            "storage": {"url": own_redis.url},
            "push": {
                "timeout": 0,  # push at once, without waiting for the sleeping contact
                "ca-file": str(sim.ca_file),
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


async def test_kill_9_of_a_node_holding_messages_then_another_node_delivers(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Node A answers 202 to two MESSAGEs for a sleeping phone and is SIGKILLed; node B,
    started afterwards on the same Redis, delivers both in order when the phone registers
    through it, each once."""
    sim = ApnsSimulator(tmp_path / "sim", apps=("org.example.phone",))
    await sim.start()
    param = f"{sim.team_id}.org.example.phone"
    port_a, port_b, http_a = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM), free_port()
    config_a = tmp_path / "node-a.toml"
    config_a.write_text(node_toml(tmp_path, port_a, http_a, own_redis, sim))
    proc = start_serve(config_a)
    asleep, awake, alice = Phone(), Phone(), Phone()
    node_b: Server | None = None
    try:
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{http_a}/health", proc)
        assert (await asyncio.to_thread(asleep.register, port_a, param)).status == 200
        for text in ("first words", "second words"):
            answer = await asyncio.to_thread(alice.message, port_a, text)
            assert answer.status == 202  # acknowledged: node A had Redis store it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        node_b = Server(node_config(tmp_path, port_b, own_redis, sim, message_accept_timeout=0))
        await node_b.start()
        assert (await asyncio.to_thread(awake.register, port_b, param)).status == 200
        bodies = []
        for _ in range(2):
            msg = await asyncio.to_thread(awake.request, "MESSAGE")
            bodies.append(msg.body)
            ok = make_response(msg, 200, "OK", to_tag="bob")
            await asyncio.to_thread(awake.sock.sendto, ok.to_bytes(), ("127.0.0.1", port_b))
        assert bodies == [b"first words", b"second words"]
        assert node_b.store is not None and node_b.router is not None
        await node_b.router.drain()
        assert await node_b.store.messages.count() == 0  # delivered, so deleted: once
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for phone in (asleep, awake, alice):
            phone.close()
        if node_b is not None:
            await node_b.stop()
        await sim.stop()


async def test_message_held_by_node_a_is_delivered_by_node_b_where_the_phone_registers(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Both nodes run from the start. Node A holds a MESSAGE (202); the phone registers
    through node B, which was already running: node B finds the message in Redis and
    delivers it over the registration's flow, once; node A, which hears the registration
    as a remote event, does not deliver it."""
    sim = ApnsSimulator(tmp_path / "sim", apps=("org.example.phone",))
    await sim.start()
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    nodes = [
        Server(node_config(tmp_path, port, own_redis, sim, message_accept_timeout=0))
        for port in ports
    ]
    for node in nodes:
        await node.start()
    node_a, node_b = ports
    asleep, awake, alice = Phone(), Phone(), Phone()
    param = f"{sim.team_id}.org.example.phone"
    try:
        assert (await asyncio.to_thread(asleep.register, node_a, param)).status == 200
        answer = await asyncio.to_thread(alice.message, node_a, "held on A")
        assert answer.status == 202
        assert (await asyncio.to_thread(awake.register, node_b, param)).status == 200
        msg, sender = await asyncio.to_thread(awake.request_from, "MESSAGE")
        assert msg.body == b"held on A"
        assert sender == node_b  # the node that saw the registration delivers
        ok = make_response(msg, 200, "OK", to_tag="bob")
        await asyncio.to_thread(awake.sock.sendto, ok.to_bytes(), ("127.0.0.1", node_b))
        router_a, router_b = nodes[0].router, nodes[1].router
        assert router_a is not None and router_b is not None
        await router_b.drain()
        await router_a.drain()
        assert router_b.stats["messages_delivered"] == 1
        assert router_a.stats["messages_delivered"] == 0
        assert nodes[1].store is not None
        assert await nodes[1].store.messages.count() == 0
    finally:
        for phone in (asleep, awake, alice):
            phone.close()
        for node in nodes:
            await node.stop()
        await sim.stop()


def start_serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def node_toml(
    tmp_path: Path, port: int, http: int, own_redis: RedisServer, sim: ApnsSimulator
) -> str:
    """The TOML file of a node run as its own process (so that it can be SIGKILLed)."""
    return f"""
[server]
data-dir = "{tmp_path / "data"}"
[sip]
listen = ["udp://127.0.0.1:{port}"]
domains = ["{DOMAIN}"]
[http]
listen = "127.0.0.1:{http}"
[storage]
url = "{own_redis.url}"
[router]
message-accept-timeout = 0
[push]
timeout = 0
ca-file = "{sim.ca_file}"
[push.apple]
server = "{sim.production_url}"
dev-server = "{sim.sandbox_url}"
key-file = "{sim.key_file}"
key-id = "{sim.key_id}"
team-id = "{sim.team_id}"
"""
