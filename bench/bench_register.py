"""REGISTER per second with RFC 8599 push parameters: `sipwake serve` (SQLite) vs Kamailio.

Run: python3 bench/bench_register.py [--calls 30000] [--window 200] [--runs 3]
                                     [--kamailio-children 4] [--no-kamailio]
                                     [--storage sqlite|redis] [--appendfsync always]
                                     [--threads]
     python3 bench/bench_register.py --in-process [--calls 5000] [--runs 4] [--profile FILE]

Each run registers ``--calls`` distinct iOS 13 push devices (one AOR each, VoIP and remote
tokens, +sip.instance) with SIPp over UDP on 127.0.0.1, in a closed loop of ``--window``
outstanding REGISTERs, against a fresh `sipwake serve` whose bindings are stored durably in
SQLite (every 200 OK is sent after the binding is committed), then against Kamailio 5.6
(usrloc in memory, db_mode 0) on the same machine; runs alternate. Prints, per run and
server: REGISTER/s (SIPp's successful calls over the run's wall time), failed calls, the
server's CPU time per REGISTER, and for sipwake the bindings found in the database after
the run (every registration must be there).

With ``--storage redis`` sipwake stores bindings in a redis-server that each run starts in
its temporary folder (``appendonly yes`` and ``--appendfsync``, ``always`` by default: the
setting docs/cluster.md requires for "nothing acknowledged is lost"), and the bindings are
counted in Redis.

``--threads`` adds, for sipwake, each busy thread's user and system CPU time and context
switches per REGISTER (from /proc; the event loop's thread is the process's main thread):
the figures that showed the store writer's GIL hand-offs (docs/benchmarks.md).

``--in-process`` measures the server's CPU cost without SIPp and without sockets: the real
server (registrar, router, SQLite store with its writer thread and group commit) runs in
this process, and the REGISTER datagrams SIPp would send are fed to its UDP protocol
object, ``--window`` in flight, a new one as each answer leaves (answers are counted, not
sent). Each run registers ``--calls`` new devices, then refreshes the same devices (same
Contact, CSeq + 1); the figure is the process CPU time (all threads) per REGISTER.
``--profile FILE`` writes a cProfile of the event-loop thread for the first registrations
(FILE.first) and the refreshes (FILE.refresh).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "sipp" / "register_bench_uac.xml"
KAMAILIO_CFG = Path(__file__).resolve().parent / "kamailio-register.cfg"
DOMAIN = "sipwake.test"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (Kamailio's workers)."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task").iterdir():
        children = child / "children"
        if children.exists():
            for c in children.read_text().split():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    total += tree_cpu(int(c))
    return total


def thread_stats(pid: int) -> dict[int, tuple[float, float, int]]:
    """Each thread of ``pid``: user and system CPU seconds, context switches."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[float, float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
            switches = sum(int(n) for n in re.findall(r"ctxt_switches:\s+(\d+)", status))
            stats[int(task.name)] = (int(fields[11]) / tick, int(fields[12]) / tick, switches)
    return stats


def thread_report(
    pid: int,
    before: dict[int, tuple[float, float, int]],
    after: dict[int, tuple[float, float, int]],
    registers: int,
) -> str:
    """The threads that ran during the run, busiest first: µs user/system, switches each."""
    rows = []
    for tid, (user, system, switches) in after.items():
        u0, s0, c0 = before.get(tid, (0.0, 0.0, 0))
        du, ds, dc = user - u0, system - s0, switches - c0
        if du + ds > 0 or dc > registers // 100:
            name = "event loop" if tid == pid else f"thread {tid}"
            rows.append((du + ds, name, du, ds, dc))
    rows.sort(reverse=True)
    n = max(registers, 1)
    return "; ".join(
        f"{name}: {du / n * 1e6:.0f} us user + {ds / n * 1e6:.0f} us sys, "
        f"{dc / n:.2f} switches per REGISTER"
        for _, name, du, ds, dc in rows
    )


def write_devices(path: Path, calls: int, prefix: str) -> None:
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for i in range(calls):
            voip = f"{i:08x}" * 8
            remote = f"{i + 1:08x}" * 8
            f.write(f"{prefix}{i};{voip};{remote};{uuid.UUID(int=i)}\n")


def start_redis(workdir: Path, appendfsync: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server for one run, with the append-only file on the working disk."""
    port = free_port(socket.SOCK_STREAM)
    conf = workdir / "redis.conf"
    conf.write_text(
        f'bind 127.0.0.1\nport {port}\ndir {workdir}\nsave ""\nappendonly yes\n'
        f"appendfsync {appendfsync}\nlogfile {workdir}/redis.log\n"
    )
    proc = subprocess.Popen(["redis-server", str(conf)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if redis_cli(port, "PING") == "PONG":
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True)
    return out.stdout.strip()


def start_sipwake(
    workdir: Path, storage: str = "", profile: Path | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    http_port = free_port(socket.SOCK_STREAM)
    sip_port = free_port(socket.SOCK_DGRAM)
    data = workdir / "data"
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\ndata-dir = "{data}"\nlog-level = "warning"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[sip]\nlisten = ["udp://127.0.0.1:{sip_port}"]\ndomains = ["{DOMAIN}"]\n'
        + (f'[storage]\nurl = "{storage}"\n' if storage else "")
    )
    cmd = [sys.executable]
    if profile is not None:  # cProfile of the event loop's thread (not the store threads)
        cmd += ["-m", "cProfile", "-o", str(profile)]
    proc = subprocess.Popen([*cmd, "-m", "sipwake", "serve", "--config", str(config)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, sip_port, data / "sipwake.db"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("sipwake serve did not become healthy")


def start_kamailio(workdir: Path, children: int) -> tuple[subprocess.Popen[bytes], int]:
    kamailio = shutil.which("kamailio") or "/usr/sbin/kamailio"
    port = free_port(socket.SOCK_DGRAM)
    cfg = workdir / "kamailio.cfg"
    text = KAMAILIO_CFG.read_text().replace("@PORT@", str(port))
    cfg.write_text(text.replace("@CHILDREN@", str(children)))
    run_dir = workdir / "kamailio-run"
    run_dir.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [kamailio, "-f", str(cfg), "-DD", "-E", "-m", "256", "-M", "16", "-Y", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Ready when it answers: an OPTIONS gets 404 from the route above.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    msg = (
        f"OPTIONS sip:{DOMAIN} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKprobe;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:p@x>;tag=1\r\nTo: <sip:p@x>\r\nCall-ID: probe\r\n"
        "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            probe.sendto(msg, ("127.0.0.1", port))
            try:
                probe.recvfrom(4096)
                return proc, port
            except TimeoutError:
                if proc.poll() is not None:
                    raise SystemExit("kamailio exited at start (see its config)") from None
    finally:
        probe.close()
    proc.kill()
    raise SystemExit("kamailio did not answer")


def counter(screen: str, name: str) -> int:
    match = re.search(rf"{name}\s*\|\s*\d+\s*\|\s*(\d+)", screen)
    return int(match.group(1)) if match else -1


def run_sipp(sipp: str, port: int, devices: Path, calls: int, window: int) -> tuple[float, str]:
    cmd = [
        sipp,
        "-sf",
        str(SCENARIO),
        f"127.0.0.1:{port}",
        "-i",
        "127.0.0.1",
        "-t",
        "u1",
        "-inf",
        str(devices),
        "-key",
        "domain",
        DOMAIN,
        "-m",
        str(calls),
        "-l",
        str(window),
        "-r",
        "100000",
        "-timeout",
        "120s",
        "-nostdin",
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    return time.monotonic() - started, proc.stdout + proc.stderr


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stored_bindings(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM bindings").fetchone()[0])


def one_run(
    name: str, args: argparse.Namespace, sipp: str, run: int
) -> tuple[float, int, float, int | None, str]:
    with tempfile.TemporaryDirectory(prefix=f"bench-register-{name}-") as tmp:
        workdir = Path(tmp)
        devices = workdir / "devices.csv"
        write_devices(devices, args.calls, f"u{run}x")
        db: Path | None = None
        redis: tuple[subprocess.Popen[bytes], int] | None = None
        if name == "sipwake" and args.storage == "redis":
            redis = start_redis(workdir, args.appendfsync)
            proc, port, db = start_sipwake(workdir, f"redis://127.0.0.1:{redis[1]}/0")
            pid_cpu = cpu_seconds
        elif name == "sipwake":
            profile = Path(f"{args.profile}.{run + 1}") if args.profile else None
            proc, port, db = start_sipwake(workdir, profile=profile)
            pid_cpu = cpu_seconds
        else:
            proc, port = start_kamailio(workdir, args.kamailio_children)
            pid_cpu = tree_cpu
        threads = args.threads and name == "sipwake"
        try:
            cpu0 = pid_cpu(proc.pid)
            stats0 = thread_stats(proc.pid) if threads else {}
            elapsed, screen = run_sipp(sipp, port, devices, args.calls, args.window)
            cpu = pid_cpu(proc.pid) - cpu0
            stats1 = thread_stats(proc.pid) if threads else {}
        finally:
            stop(proc)
        ok = counter(screen, "Successful call")
        report = thread_report(proc.pid, stats0, stats1, ok) if threads else ""
        failed = counter(screen, "Failed call")
        if redis is not None:
            stored: int | None = int(redis_cli(redis[1], "ZCARD", "sipwake:exp") or -1)
            stop(redis[0])
        else:
            stored = stored_bindings(db) if db is not None else None
        return ok / elapsed, failed, cpu / max(ok, 1) * 1e6, stored, report


def register_datagram(i: int, run: int, cseq: int) -> bytes:
    """What tests/sipp/register_bench_uac.xml sends for device ``i`` (one AOR each)."""
    voip = f"{i:08x}" * 8
    remote = f"{i + 1:08x}" * 8
    user = f"u{run}x{i}"
    return (
        f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{run}-{i}-{cseq};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{DOMAIN}>;tag={i}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\n"
        f"Call-ID: {run}-{i}///bench@127.0.0.1\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.1:5061;transport=udp;pn-provider=apns;"
        f"pn-param=ABCDE12345.org.example.app.voip%26remote;"
        f'pn-prid={voip}:voip%26{remote}:remote>;+sip.instance="<urn:uuid:{uuid.UUID(int=i)}>"\r\n'
        "Expires: 3600\r\nUser-Agent: sipp-bench\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def loop_thread_cpu() -> float:
    """CPU seconds of this process's main thread (the event loop's)."""
    pid = os.getpid()
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(args: argparse.Namespace) -> None:
    """The real server in this process, REGISTER datagrams fed to its UDP protocol."""
    import asyncio
    import cProfile
    import gc

    from sipwake import eventloop
    from sipwake.config import load_config
    from sipwake.server import Server, tune_gc

    class NullSocket:
        """Stands for the UDP socket: counts the answers and feeds the next REGISTER."""

        def __init__(self) -> None:
            self.ok = 0
            self.other = 0
            self.on_answer: Callable[[], None] = lambda: None

        def sendto(self, data: bytes, addr: object) -> None:
            if data.startswith(b"SIP/2.0 200 "):
                self.ok += 1
            else:
                self.other += 1
            self.on_answer()

    async def feed(proto: Any, sock: NullSocket, batch: list[bytes]) -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = iter(batch)
        answered = [0]
        source = ("127.0.0.1", 5061)

        def send_next() -> None:
            data = next(pending, None)
            if data is not None:
                proto.datagram_received(data, source)

        def on_answer() -> None:
            answered[0] += 1
            if answered[0] == len(batch):
                if not done.done():
                    done.set_result(None)
            else:
                loop.call_soon(send_next)

        sock.on_answer = on_answer
        started = time.process_time()
        for _ in range(min(args.window, len(batch))):
            send_next()
        await done
        return time.process_time() - started

    gc_time = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:  # CPU time of the loop's thread
        if phase == "start":
            gc_time[1] = time.thread_time()
        else:
            gc_time[0] += time.thread_time() - gc_time[1]

    async def measure(workdir: Path) -> None:
        sip_port = free_port(socket.SOCK_DGRAM)
        config = workdir / "bench.toml"
        config.write_text(
            f'[server]\ndata-dir = "{workdir / "data"}"\nlog-level = "warning"\n'
            # No HTTP API: not measured here, and its default port 8080 is taken when
            # another in-process run (or anything else) is using the machine.
            '[http]\nlisten = ""\n'
            f'[sip]\nlisten = ["udp://127.0.0.1:{sip_port}"]\ndomains = ["{DOMAIN}"]\n'
        )
        server = Server(load_config(config))
        await server.start()
        tune_gc()
        gc.callbacks.append(on_gc)
        try:
            assert server.sip is not None
            udp = server.sip.transports._udp
            sock = NullSocket()
            real, proto = udp[0]
            proto.transport = sock
            udp[0] = (sock, proto)  # responses sent by the transaction layer go here too
            for run in range(args.runs):
                for phase, cseq in (("first", 1), ("refresh", 2)):
                    batch = [register_datagram(i, run, cseq) for i in range(args.calls)]
                    ok0 = sock.ok
                    prof = cProfile.Profile() if args.profile and run == 0 else None
                    if prof is not None:
                        prof.enable()
                    loop0, gc0 = loop_thread_cpu(), gc_time[0]
                    cpu = await feed(proto, sock, batch)
                    on_loop = loop_thread_cpu() - loop0
                    in_gc = gc_time[0] - gc0
                    if prof is not None:
                        prof.disable()
                        prof.dump_stats(f"{args.profile}.{phase}")
                    ok = sock.ok - ok0
                    print(
                        f"run {run + 1} {phase:8s}: {cpu / len(batch) * 1e6:6.1f} us CPU per "
                        f"REGISTER (all threads; event loop {on_loop / len(batch) * 1e6:.0f}, "
                        f"of which garbage collection {in_gc / len(batch) * 1e6:.0f}), "
                        f"{ok} x 200 OK, {sock.other} other answers",
                        flush=True,
                    )
            assert server.store is not None
            stored = await server.store.bindings.count()
            print(f"{stored} bindings stored")
            udp[0] = (real, proto)
        finally:
            await server.stop()

    # The loop `sipwake serve` runs on: uvloop unless SIPWAKE_EVENT_LOOP=asyncio.
    print(f"event loop: {eventloop.choose_loop()[0]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-register-inproc-") as tmp:
        eventloop.run(measure(Path(tmp)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, help="REGISTERs per run (30000; 5000 in-process)")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--runs", type=int, help="runs (3; 4 in-process)")
    parser.add_argument("--kamailio-children", type=int, default=4)
    parser.add_argument("--no-kamailio", action="store_true")
    parser.add_argument("--storage", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="always")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run sipwake under cProfile, writing FILE.<run> (pstats) at its exit; "
        "the CPU figures of such runs include the profiler",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="also print sipwake's CPU time and context switches per REGISTER, per thread",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="no SIPp, no sockets: the server's CPU per REGISTER (first and refresh)",
    )
    args = parser.parse_args()
    if args.in_process:
        args.calls = args.calls or 5000
        args.runs = args.runs or 4
        in_process(args)
        return
    args.calls = args.calls or 30000
    args.runs = args.runs or 3
    sipp = shutil.which("sipp")
    if sipp is None:
        raise SystemExit("sipp (Debian sip-tester) is not installed")
    servers = ["sipwake"]
    if not args.no_kamailio:
        if shutil.which("kamailio") is None and not Path("/usr/sbin/kamailio").exists():
            raise SystemExit("kamailio (Debian package kamailio) is not installed")
        servers.append("kamailio")
    from sipwake.eventloop import choose_loop

    # `sipwake serve` inherits SIPWAKE_EVENT_LOOP from this process.
    print(f"sipwake event loop: {choose_loop()[0]}", flush=True)
    rates: dict[str, list[float]] = {s: [] for s in servers}
    for run in range(args.runs):
        for name in servers:
            rate, failed, cpu_us, stored, report = one_run(name, args, sipp, run)
            rates[name].append(rate)
            where = "Redis" if args.storage == "redis" else "SQLite"
            extra = f", {stored} bindings in {where}" if stored is not None else ""
            print(
                f"run {run + 1} {name:8s}: {rate:8.0f} REGISTER/s, {failed} failed, "
                f"{cpu_us:6.0f} us server CPU per REGISTER{extra}",
                flush=True,
            )
            if report:
                print(f"  threads: {report}", flush=True)
    for name, values in rates.items():
        print(f"{name:8s}: median {statistics.median(values):.0f} REGISTER/s over {args.runs}")
    if "kamailio" in rates:
        ratio = statistics.median(rates["sipwake"]) / statistics.median(rates["kamailio"])
        print(f"sipwake / kamailio: {ratio:.2f}")


if __name__ == "__main__":
    main()
