"""OPTIONS answered per second over UDP by one `sipwake serve` process, driven by SIPp.

Run: python3 bench/bench_sip_options.py [--calls 60000] [--window 400] [--runs 3] [--profile]
     python3 bench/bench_sip_options.py --in-process [--runs 30]   (no sockets: CPU cost)

``--in-process`` measures the path ``serve`` takes (OPTIONS to the server is answered
statelessly) and, for comparison, the same with a server transaction per request.

SIPp keeps ``--window`` OPTIONS outstanding (closed loop: a new one leaves as an answer
arrives), so the figure is what the server sustains rather than what the client offers.
Prints, per run: answered/s (SIPp's successful calls over the run's wall time), failed
calls, retransmissions, and the server's CPU time per request (from /proc, so it does not
depend on how much of the machine SIPp took). ``--profile`` runs the server under cProfile
and prints its top functions after the last run.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "sipp" / "options_uac.xml"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(workdir: Path, profile: Path | None) -> tuple[subprocess.Popen[bytes], int]:
    http_port = free_port(socket.SOCK_STREAM)
    sip_port = free_port(socket.SOCK_DGRAM)
    config = workdir / "bench.toml"
    config.write_text(
        f'[server]\ndata-dir = "data"\nlog-level = "warning"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[sip]\nlisten = ["udp://127.0.0.1:{sip_port}"]\n'
    )
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "sipwake", "serve", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=workdir)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, sip_port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("sipwake serve did not become healthy")


def counter(screen: str, name: str) -> int:
    match = re.search(rf"{name}\s*\|\s*\d+\s*\|\s*(\d+)", screen)
    return int(match.group(1)) if match else -1


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sipp(sipp: str, port: int, calls: int, window: int) -> tuple[float, float, str]:
    cmd = [
        sipp,
        "-sf",
        str(SCENARIO),
        f"127.0.0.1:{port}",
        "-i",
        "127.0.0.1",
        "-t",
        "u1",
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
    cpu = children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    return time.monotonic() - started, children_cpu() - cpu, proc.stdout + proc.stderr


def options_datagram(i: int) -> bytes:
    """What SIPp's options_uac.xml sends, with a fresh branch and Call-ID."""
    return (
        "OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{i};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:sipp@127.0.0.1:5061>;tag=1\r\n"
        f"To: <sip:127.0.0.1:5060>\r\nCall-ID: {i}-1@127.0.0.1\r\nCSeq: 1 OPTIONS\r\n"
        "Contact: <sip:sipp@127.0.0.1:5061;transport=UDP>\r\nAccept: application/sdp\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def in_process(count: int, runs: int, stateful: bool) -> None:
    """Feed datagrams straight into the UDP protocol: the server's CPU cost per request.

    The TU is the proxy core ``serve`` runs. ``stateful`` turns off its stateless answer
    to OPTIONS, so every request gets a server transaction (kept 32 s by Timer J), as
    every request other than OPTIONS to the server does.
    """
    import asyncio
    import gc

    from sipwake.config import Config
    from sipwake.proxy.core import ProxyCore
    from sipwake.server import make_sip_endpoint, tune_gc
    from sipwake.sip.message import parse_message
    from sipwake.sip.transport import _UdpProtocol

    class NullSocket:
        sent = 0

        def sendto(self, data: bytes, addr: object) -> None:
            self.sent += 1
            self.last = data

    async def measure() -> None:
        tune_gc()
        config = Config()
        # OPTIONS for the server itself needs neither the registrar nor the router.
        core = ProxyCore(config, None, None)  # type: ignore[arg-type]
        if stateful:
            core.stateless_methods = frozenset()
        endpoint = make_sip_endpoint(config, core)
        endpoint.transports.listening.append(("UDP", "127.0.0.1", 5060))
        proto = _UdpProtocol(endpoint.transports)
        sock = NullSocket()
        proto.transport = sock  # type: ignore[assignment]
        endpoint.transports._udp.append((sock, proto))  # type: ignore[arg-type]
        full: list[float] = []
        parse: list[float] = []
        gc_time = [0.0, 0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_time[1] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[1]

        gc.collect()
        objects_before = len(gc.get_objects())
        gc.callbacks.append(on_gc)
        for run in range(runs):
            batch = [options_datagram(run * count + i) for i in range(count)]
            started = time.process_time()
            for data in batch:
                parse_message(data)
            parse.append((time.process_time() - started) / count)
            started = time.process_time()
            for data in batch:
                proto.datagram_received(data, ("127.0.0.1", 5061))
            full.append((time.process_time() - started) / count)
        gc.callbacks.remove(on_gc)
        assert sock.sent == runs * count, "every OPTIONS must be answered"
        alive = len(endpoint.layer)
        gc.collect()
        gc.collect()  # a tuple is untracked at the first pass that sees its items untracked
        tracked = (len(gc.get_objects()) - objects_before) / alive if alive else 0.0
        kind = "stateful (server transaction)" if stateful else "stateless (as served)"
        print(
            f"in-process, {kind}, best of {runs} x {count}: {min(full) * 1e6:.1f} us per "
            f"OPTIONS answered (parse_message alone {min(parse) * 1e6:.1f} us), "
            f"= {1 / min(full):,.0f}/s on one core before socket system calls; "
            f"mean of all runs {statistics.mean(full) * 1e6:.1f} us, of which garbage "
            f"collection {gc_time[0] / (runs * count) * 1e6:.1f} us; "
            f"{alive} transactions alive at the end"
            + (f", {tracked:.1f} GC-tracked objects each" if alive else "")
        )
        endpoint.transports._udp.clear()
        await endpoint.close()
        gc.collect()

    asyncio.run(measure())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=60000, help="OPTIONS per run")
    parser.add_argument("--window", type=int, default=400, help="OPTIONS in flight")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile the server")
    parser.add_argument(
        "--in-process", action="store_true", help="no sockets, no SIPp: CPU per request"
    )
    args = parser.parse_args()
    if args.in_process:
        # --runs 30: 300 000 requests, what 10 000/s brings in Timer J's 32 s.
        in_process(10000, max(args.runs, 5), stateful=False)
        in_process(10000, max(args.runs, 5), stateful=True)
        return 0
    sipp = shutil.which("sipp")
    if sipp is None:
        raise SystemExit("sipp not found (Debian package sip-tester)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        profile = workdir / "serve.prof" if args.profile else None
        proc, port = start_server(workdir, profile)
        rates: list[float] = []
        try:
            for run in range(1, args.runs + 1):
                cpu_before = cpu_seconds(proc.pid)
                elapsed, sipp_cpu, screen = run_sipp(sipp, port, args.calls, args.window)
                cpu = cpu_seconds(proc.pid) - cpu_before
                ok = counter(screen, "Successful call")
                failed = counter(screen, "Failed call")
                retrans = sum(int(n) for n in re.findall(r"(\d+)\s+retransmissions?", screen))
                if ok <= 0:
                    print(screen[-3000:])
                    raise SystemExit("SIPp reported no successful call")
                rate = ok / elapsed
                rates.append(rate)
                print(
                    f"run {run}: {ok} answered in {elapsed:.2f} s = {rate:,.0f} OPTIONS/s; "
                    f"failed {failed}; server CPU {cpu / ok * 1e6:.1f} us/request "
                    f"({cpu / elapsed * 100:.0f}% of a core); SIPp {sipp_cpu / elapsed * 100:.0f}% "
                    f"of a core; retransmissions {retrans}; load {os.getloadavg()[0]:.1f}"
                )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
        print(f"median: {statistics.median(rates):,.0f} OPTIONS/s over {args.runs} run(s)")
        if profile is not None and profile.exists():
            pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
