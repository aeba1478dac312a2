"""``/pnm2/send`` requests per second, end to end: wrk → ``sipwake serve`` → APNs sink.

Starts nginx as the APNs sink (``bench/nginx_sink.py``: TLS, h2, answers 200 and echoes
``apns-id``) so that the upstream is not the bottleneck, then ``sipwake serve`` (a separate
process, uvloop) with one configured iOS app using token auth against it, then wrk (Debian
package ``wrk``) posting Acrobits ``NotifyTextMessage`` requests with a distinct 64-hex
token each. After each run the server's ``/metrics`` is read to check that every request
became a push the sink accepted (wrk counts HTTP statuses only, and /pnm2 answers HTTP 200
with the outcome in the body). Every process is stopped by its PID.

    python3 bench/bench_http_api.py                      # the figures in docs/benchmarks.md
    python3 bench/bench_http_api.py --connections 32,128 --duration 5 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nginx_sink import NginxSink, free_port

APP = "org.example.app"

LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local token = string.format("%064x", n + 1000000 * (id or 0))
  local body = '{"verb":"NotifyTextMessage","AppId":"org.example.app","DeviceToken":"'
    .. token .. '","Selector":"acc-1","Message":"hello","Badge":1}'
  return wrk.format(nil, nil, nil, body)
end
"""


def write_config(directory: Path, sink: NginxSink, port: int) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = directory / "AuthKey.p8"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = directory / "sipwake.toml"
    config.write_text(
        f"""
[server]
data-dir = "{directory / "data"}"
log-level = "warning"
[sip]
listen = []
[http]
listen = "127.0.0.1:{port}"
[push]
ca-file = "{sink.ca}"
max-queue-size = 0
[push.apple]
server = "https://127.0.0.1:{sink.port}"
[apps."{APP}"]
provider = "apns"
key-file = "{key_file}"
key-id = "ABC123DEFG"
team-id = "DEF123GHIJ"
"""
    )
    return config


def wait_health(url: str, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"sipwake serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)  # polling readiness
    raise RuntimeError("sipwake did not become healthy")


def pushes_sent(base: str) -> tuple[int, int]:
    """(sent, not sent) pushes so far, from /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    sent = other = 0
    for line in text.splitlines():
        m = re.match(r'sipwake_pushes_total\{.*result="([a-z-]+)"\} (\d+)', line)
        if m:
            if m[1] == "sent":
                sent += int(m[2])
            else:
                other += int(m[2])
    return sent, other


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str, script: Path, connections: int, duration: int, threads: int
) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    lat = {p: re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out) for p in ("50", "99")}

    def ms(m: re.Match[str] | None) -> float:
        if m is None:
            return float("nan")
        return float(m[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m[2]]

    return {
        "rps": rps,
        "requests": total,
        "non2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "p50_ms": ms(lat["50"]),
        "p99_ms": ms(lat["99"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", default="64,256", help="comma-separated wrk -c values")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--runs", type=int, default=3, help="runs per connection count")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument(
        "--split",
        action="store_true",
        help="also measure GET /health and /pnm2/send with an unknown AppId (HTTP cost only)",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.stderr.write("wrk not found: apt-get install wrk\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="sipwake-bench-http-") as tmp:
        d = Path(tmp)
        (d / "sink").mkdir()
        sink = NginxSink(d / "sink")
        sink.start()
        port = free_port()
        config = write_config(d, sink, port)
        script = d / "pnm2.lua"
        script.write_text(LUA)
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_health(base + "/health", proc)
            # Warm-up: opens the HTTP/2 connection and signs the provider token.
            run_wrk(base + "/pnm2/send", script, 8, 1, 1)
            results: dict[int, list[dict[str, float]]] = {}
            for c in (int(x) for x in args.connections.split(",")):
                for _ in range(args.runs):
                    before = pushes_sent(base)
                    cpu0 = cpu_seconds(proc.pid)
                    r = run_wrk(base + "/pnm2/send", script, c, args.duration, args.threads)
                    cpu1 = cpu_seconds(proc.pid)
                    after = pushes_sent(base)
                    # Server CPU per request: what one free core would sustain, whatever
                    # else the machine runs at the time.
                    r["cpu_us_per_request"] = (cpu1 - cpu0) * 1e6 / max(1, r["requests"])
                    r["pushes_sent"] = after[0] - before[0]
                    r["pushes_not_sent"] = after[1] - before[1]
                    results.setdefault(c, []).append(r)
                    print(json.dumps({"connections": c, **r}), flush=True)
            if args.split:
                bad = d / "unknown-app.lua"
                bad.write_text(LUA.replace(APP, "org.unknown.app"))
                health = d / "health.lua"
                health.write_text("")
                for name, path, lua in (
                    ("GET /health", "/health", health),
                    ("/pnm2/send, unknown AppId (answered 400, no push)", "/pnm2/send", bad),
                    ("/pnm2/send, pushed", "/pnm2/send", script),
                ):
                    cpu0 = cpu_seconds(proc.pid)
                    r = run_wrk(base + path, lua, 64, args.duration, args.threads)
                    used = (cpu_seconds(proc.pid) - cpu0) * 1e6 / max(1, r["requests"])
                    print(json.dumps({"split": name, "rps": r["rps"], "cpu_us_per_request": used}))
            print()
            print(
                "| wrk connections | median requests/s | runs | p50 ms | p99 ms "
                "| server CPU µs/request | requests/s per free core | pushes sent / requests |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for c, rs in results.items():
                med = statistics.median(r["rps"] for r in rs)
                runs = ", ".join(f"{r['rps']:.0f}" for r in rs)
                p50 = statistics.median(r["p50_ms"] for r in rs)
                p99 = statistics.median(r["p99_ms"] for r in rs)
                sent = sum(r["pushes_sent"] for r in rs)
                reqs = sum(r["requests"] for r in rs)
                cpu = statistics.median(r["cpu_us_per_request"] for r in rs)
                print(
                    f"| {c} | {med:.0f} | {runs} | {p50:.1f} | {p99:.1f} | {cpu:.0f} "
                    f"| {1e6 / cpu:.0f} | {sent} / {reqs} |"
                )
            print(f"load average: {os.getloadavg()}")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
