"""Push-aware proxy latency: INVITE-to-push and re-REGISTER-to-INVITE, on loopback.

Run: python3 bench/bench_proxy_latency.py [--calls 300] [--warmup 30] [--profile]
     python3 bench/bench_proxy_latency.py --in-process   (sipwake's own part, no sockets)

One `sipwake serve` process (SQLite store, UDP) pushes to the APNs simulator running in
this process. For each call, a fresh iOS device (its own AOR, VoIP token and instance)
registers and goes silent; then:

1. INVITE-to-push: a caller sends an INVITE; the clock stops when the simulator has
   accepted the PushKit push (its answer callback, before any reply leaves);
2. re-REGISTER-to-INVITE: the woken device registers again from a new port; the clock
   stops when the held INVITE arrives on that port. The device answers 486 so the call
   ends at once (the old port answers 100, then the CANCEL the proxy sends it).

Calls are sequential: this measures the time one request spends in sipwake (plus one
simulator hop for the push), not throughput. SIPp cannot do this measurement: it matches
messages to scenarios by Call-ID, and the held INVITE carries the caller's Call-ID, not the
device's. Prints p50/p90/p99/max in milliseconds for both, and the server's CPU time per
call (steadier than latencies on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sipwake.simulator.apns import ApnsSimulator, Environment, Verdict
from sipwake.sip.message import Request, Response, make_response, parse_message

DOMAIN = "bench.test"
BUNDLE = "org.example.app"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer(asyncio.DatagramProtocol):
    """A UDP user agent: a queue of what arrives; answers CANCEL like a phone would."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[Request | Response, float]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.answer_100 = False
        self.invite: Request | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        now = time.perf_counter()
        msg = parse_message(data)
        if isinstance(msg, Request) and self.answer_100:
            if msg.method == "INVITE":
                self.invite = msg
                self.reply(msg, 100, addr)
            elif msg.method == "CANCEL":
                self.reply(msg, 200, addr)
                if self.invite is not None:
                    self.reply(self.invite, 487, addr)
            return
        self.inbox.put_nowait((msg, now))

    def reply(self, request: Request, status: int, addr: tuple[str | object, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(make_response(request, status, to_tag="dev").to_bytes(), addr)

    def send(self, text: str, server: tuple[str, int]) -> float:
        assert self.transport is not None
        data = text.replace("\n", "\r\n").encode()
        started = time.perf_counter()
        self.transport.sendto(data, server)
        return started

    async def expect(self, what: str) -> tuple[Request | Response, float]:
        """The next message that is the request ``what`` or a response with that status."""
        while True:
            msg, at = await asyncio.wait_for(self.inbox.get(), 10)
            if isinstance(msg, Request) and msg.method == what:
                return msg, at
            if isinstance(msg, Response) and str(msg.status) == what:
                return msg, at


async def peer() -> Peer:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    return protocol


def register(user: str, port: int, token: str, sim: ApnsSimulator, n: int) -> str:
    pn = f"pn-provider=apns.dev;pn-param={sim.team_id}.{BUNDLE}.voip;pn-prid={token}"
    return (
        f"REGISTER sip:{DOMAIN} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKr{user}{n};rport\n"
        f"Max-Forwards: 70\nFrom: <sip:{user}@{DOMAIN}>;tag=r{n}\nTo: <sip:{user}@{DOMAIN}>\n"
        f"Call-ID: reg-{user}-{n}\nCSeq: {n} REGISTER\n"
        f'Contact: <sip:{user}@127.0.0.1:{port};{pn}>;+sip.instance="<urn:uuid:{user}>"\n'
        "Expires: 3600\nContent-Length: 0\n\n"
    )


def invite(user: str, port: int, n: int) -> str:
    return (
        f"INVITE sip:{user}@{DOMAIN} SIP/2.0\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKc{n};rport\n"
        f"Max-Forwards: 70\nFrom: <sip:caller@{DOMAIN}>;tag=c{n}\nTo: <sip:{user}@{DOMAIN}>\n"
        f"Call-ID: call-{n}\nCSeq: 1 INVITE\nContact: <sip:caller@127.0.0.1:{port}>\n"
        "Content-Length: 0\n\n"
    )


def ack(response: Response, user: str) -> str:
    via = response.headers.get("via")
    return (
        f"ACK sip:{user}@{DOMAIN} SIP/2.0\nVia: {via}\nMax-Forwards: 70\n"
        f"From: {response.headers.get('from')}\nTo: {response.headers.get('to')}\n"
        f"Call-ID: {response.call_id}\nCSeq: 1 ACK\nContent-Length: 0\n\n"
    )


def start_server(
    workdir: Path, sim: ApnsSimulator, profile: Path | None = None, switch_interval: float = 0
) -> tuple[subprocess.Popen[bytes], int]:
    http_port = free_port(socket.SOCK_STREAM)
    sip_port = free_port(socket.SOCK_DGRAM)
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\ndata-dir = "data"\nlog-level = "warning"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[sip]\nlisten = ["udp://127.0.0.1:{sip_port}"]\ndomains = ["{DOMAIN}"]\n'
        "[router]\ncall-fork-timeout = 10\n"
        f'[push]\ntimeout = 0\nca-file = "{sim.ca_file}"\n'
        f'[push.apple]\nkey-file = "{sim.key_file}"\nkey-id = "{sim.key_id}"\n'
        f'team-id = "{sim.team_id}"\nserver = "{sim.production_url}"\n'
        f'dev-server = "{sim.sandbox_url}"\n[push.firebase]\nenabled = false\n'
    )
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    if switch_interval:
        # The same `sipwake serve`, with the interpreter's GIL switch interval set first.
        boot = (
            f"import sys; sys.setswitchinterval({switch_interval}); "
            "from sipwake.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        args = [*cmd, "-c", boot, "serve", "--config", str(config)]
    else:
        args = [*cmd, "-m", "sipwake", "serve", "--config", str(config)]
    proc = subprocess.Popen(args, cwd=workdir)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1):
                return proc, sip_port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("sipwake serve did not become healthy")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return (
        f"{name:24s} n={len(ms):4d}  p50={q[49]:6.2f}  p90={q[89]:6.2f}  "
        f"p99={q[98]:6.2f}  max={ms[-1]:6.2f} ms"
    )


async def run(calls: int, warmup: int, profile: bool, switch_interval: float) -> None:
    pushed: dict[str, float] = {}
    waiters: dict[str, asyncio.Future[None]] = {}

    def on_verdict(env: Environment, path: str, verdict: Verdict) -> None:
        token = path.rsplit("/", 1)[-1]
        pushed[token] = time.perf_counter()
        fut = waiters.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    with tempfile.TemporaryDirectory() as tmp:
        sim = ApnsSimulator(Path(tmp) / "sim", apps=(BUNDLE,), on_verdict=on_verdict)
        await sim.start()
        prof = Path(tmp) / "server.prof" if profile else None
        proc, sip_port = await asyncio.to_thread(
            start_server, Path(tmp), sim, prof, switch_interval
        )
        server = ("127.0.0.1", sip_port)
        to_push: list[float] = []
        to_invite: list[float] = []
        caller = await peer()
        loop = asyncio.get_running_loop()
        try:
            cpu_start = 0.0
            for n in range(1, calls + warmup + 1):
                if n == warmup + 1:
                    cpu_start = cpu_seconds(proc.pid)
                user = f"dev{n:06d}"
                token = f"{n:064x}"
                old, new = await peer(), await peer()
                seq = itertools.count(1)
                # The device registers, then sleeps.
                old.send(register(user, old.port, token, sim, next(seq)), server)
                await old.expect("200")
                old.answer_100 = True
                # 1. INVITE to push.
                waiters[token] = loop.create_future()
                sent = caller.send(invite(user, caller.port, n), server)
                await asyncio.wait_for(waiters[token], 10)
                if n > warmup:
                    to_push.append(pushed[token] - sent)
                # 2. re-REGISTER to INVITE, on the new port.
                sent = new.send(register(user, new.port, token, sim, next(seq)), server)
                inv, at = await new.expect("INVITE")
                if n > warmup:
                    to_invite.append(at - sent)
                assert isinstance(inv, Request)
                new.reply(inv, 486, server)
                busy, _ = await caller.expect("486")
                assert isinstance(busy, Response)
                caller.send(ack(busy, user), server)
                for p in (old, new):
                    assert p.transport is not None
                    p.transport.close()
            cpu = cpu_seconds(proc.pid) - cpu_start
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 10)
            await sim.stop()
        if prof is not None:
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(25)
        print(summary("INVITE-to-push", to_push))
        print(summary("re-REGISTER-to-INVITE", to_invite))
        print(
            f"server CPU per call (2 REGISTERs, INVITE, push, fork-late, 486, CANCEL): "
            f"{cpu / calls * 1e6:.0f} µs; load average {os.getloadavg()[0]:.1f}"
        )


class _Transports:
    def local_address(self, transport: str) -> tuple[str, int] | None:
        return ("127.0.0.1", 5060)


class _Wire:
    """An endpoint without sockets: the router's requests and responses are timestamped."""

    def __init__(self) -> None:
        from sipwake.clock import SystemClock
        from sipwake.sip.transaction import TransactionLayer

        self.layer = TransactionLayer(SystemClock())
        self.transports = _Transports()
        self.invites: dict[int, float] = {}

    def send_request(self, request: Request, address: Any) -> Any:
        if request.method == "INVITE":
            self.invites[address.port] = time.perf_counter()
        txn, _ = self.layer.send_request(request, address)
        return txn

    def send_response(self, txn: Any, response: Response) -> None:
        self.layer.send_response(txn, response)

    def respond(self, txn: Any, status: int, reason: str | None = None, **kw: str) -> Response:
        response = make_response(txn.request, status, reason)
        self.send_response(txn, response)
        return response

    def send_stateless(self, message: Any, address: Any) -> None:
        pass


class _PushRecorder:
    """A push provider that only notes when each push was handed to it."""

    name = "recorder"

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def accepts(self, destination: Any) -> bool:
        return True

    async def send(self, request: Any) -> Any:
        from sipwake.push.request import Outcome, PushResult

        self.at[request.destination.token] = time.perf_counter()
        return PushResult(Outcome.SENT)

    async def aclose(self) -> None:
        pass


async def run_in_process(calls: int, warmup: int) -> None:
    """The same two measurements inside one process: what sipwake itself adds.

    Real registrar, router and SQLite store (as `sipwake serve` builds them); no sockets,
    no TLS, no simulator: the INVITE is handed to the router, the push to a recorder.
    """
    from sipwake.config import parse_config
    from sipwake.proxy.registrar import Registrar
    from sipwake.proxy.router import Router
    from sipwake.push.service import PushService
    from sipwake.sip.transaction import Address
    from sipwake.store import open_url

    config = parse_config(
        {
            "sip": {"domains": [DOMAIN]},
            "router": {"call-fork-timeout": 10},
            "push": {"timeout": 0},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = await open_url("", Path(tmp))
        recorder = _PushRecorder()
        push = PushService([recorder])  # type: ignore[list-item]
        registrar = Registrar(config, store, push=push)
        router = Router(config, registrar, push=push)
        wire = _Wire()
        router.attach(wire)  # type: ignore[arg-type]
        team = "ABCD123456"
        fake = type("Sim", (), {"team_id": team})()
        to_push: list[float] = []
        to_invite: list[float] = []
        caller = Address("UDP", "127.0.0.1", 7000)
        for n in range(1, calls + warmup + 1):
            user = f"dev{n:06d}"
            token = f"{n:064x}"
            old_port, new_port = 10000 + 2 * (n % 20000), 10001 + 2 * (n % 20000)
            req = parse_message(
                register(user, old_port, token, fake, 1).replace("\n", "\r\n").encode()
            )
            assert isinstance(req, Request)
            ok = await registrar.handle_register(req, Address("UDP", "127.0.0.1", old_port))
            assert ok.status == 200
            inv = parse_message(invite(user, 7000, n).replace("\n", "\r\n").encode())
            assert isinstance(inv, Request)
            started = time.perf_counter()
            actions = wire.layer.receive_request(inv, caller)
            server_txn = actions[0].transaction  # type: ignore[union-attr]
            router.on_request(wire, server_txn, inv, caller)  # type: ignore[arg-type]
            await router.drain()
            if n > warmup:
                to_push.append(recorder.at[token] - started)
            req = parse_message(
                register(user, new_port, token, fake, 2).replace("\n", "\r\n").encode()
            )
            assert isinstance(req, Request)
            started = time.perf_counter()
            await registrar.handle_register(req, Address("UDP", "127.0.0.1", new_port))
            if n > warmup:
                to_invite.append(wire.invites[new_port] - started)
            router._finish(router._by_txn[server_txn], None)  # end the call here
        await router.aclose()
        await registrar.aclose()
        await store.close()
    print(summary("INVITE-to-push (in-process)", to_push))
    print(summary("re-REGISTER-to-INVITE (in-process)", to_invite))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=300, help="measured calls (300)")
    p.add_argument("--warmup", type=int, default=30, help="calls not counted first (30)")
    p.add_argument("--profile", action="store_true", help="cProfile the server")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=0,
        metavar="S",
        help="run the server with sys.setswitchinterval(S) (default: Python's 0.005)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="no sockets: registrar, router and SQLite in this process (sipwake's own part)",
    )
    args = p.parse_args()
    if args.in_process:
        asyncio.run(run_in_process(args.calls, args.warmup))
        return
    asyncio.run(run(args.calls, args.warmup, args.profile, args.switch_interval))


if __name__ == "__main__":
    main()
