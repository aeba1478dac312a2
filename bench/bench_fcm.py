"""FCM HTTP v1 pushes per second from one process, against an nginx FCM sink.

nginx (TLS, h2 and HTTP/1.1 on one port, one worker, 1000 concurrent streams) answers
``messages:send`` like FCM; the OAuth2 token comes from the in-process FCM simulator (one
fetch per run: the token is cached). Each client runs in its own fresh process, runs
alternate, and the median pushes/s of each is printed. nginx is stopped by its PID.

    python3 bench/bench_fcm.py                          # the figures in docs/benchmarks.md
    python3 bench/bench_fcm.py --runs 5 --count 40000

Clients: ``sipwake`` is the real FCM v1 provider (message building, access token, result
mapping) over HTTP/2 (:class:`sipwake.push.http2.Http2Client`); ``sipwake-http1`` is the
same provider over the HTTP/1.1 transport (aiohttp, 8 kept-alive connections); ``raw`` is the
bare Http2Client posting a prepared body, the ceiling for the provider.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nginx_sink

PROJECT = "sipwake-bench"
CLIENTS = ("sipwake", "sipwake-http1", "raw")


async def closed_loop(send: Any, count: int, concurrency: int) -> tuple[float, int]:
    """Keep ``concurrency`` pushes in flight until ``count`` are answered; (rate, failures)."""
    failures = 0
    numbers = iter(range(min(count, 2000)))

    async def worker() -> None:
        nonlocal failures
        for i in numbers:
            if not await send(i):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, 200))))  # warm-up
    numbers = iter(range(count))
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start), failures


async def make_provider_sender(args: argparse.Namespace, http2: bool) -> tuple[Any, Any]:
    from sipwake.push.providers.fcm import FcmV1Provider
    from sipwake.push.providers.fcm_auth import ServiceAccount
    from sipwake.push.providers.transport import Http1Transport, Http2Transport, ssl_context
    from sipwake.push.request import Destination, Provider, PushKind, PushRequest
    from sipwake.simulator.fcm import FcmSimulator

    sim = await FcmSimulator().start()
    account = ServiceAccount.from_json(sim.create_service_account(PROJECT))
    ctx = ssl_context(args.ca)
    transport = Http2Transport(ssl_context=ctx) if http2 else Http1Transport(ssl_context=ctx)
    provider = FcmV1Provider(
        {PROJECT: account},
        server=f"https://127.0.0.1:{args.port}",
        transport=transport,
        token_transport=Http1Transport(),
    )

    async def send(i: int) -> bool:
        request = PushRequest(
            Destination(Provider.FCM, PROJECT, f"fcm-token-{i:0>140}"),
            PushKind.CALL,
            call_id=f"a84b4c76e66710-{i}",
            from_uri="sip:alice@example.org",
            display_name="Alice",
        )
        return (await provider.send(request)).ok

    async def close() -> None:
        await provider.aclose()
        await sim.aclose()

    return send, close


async def make_raw_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    from sipwake.push.http2 import Http2Client
    from sipwake.push.providers.transport import ssl_context

    client = Http2Client(f"https://127.0.0.1:{args.port}", ssl_context=ssl_context(args.ca))
    path = f"/v1/projects/{PROJECT}/messages:send"
    headers = [("authorization", "Bearer ya29." + "x" * 200), ("content-type", "application/json")]

    async def send(i: int) -> bool:
        body = json.dumps({"message": {"token": f"fcm-token-{i:0>140}", "android": {
            "priority": "high", "ttl": "30s", "data": {"call-id": str(i)}}}}).encode()  # fmt: skip
        resp = await client.request("POST", path, headers, body)
        return resp.status == 200

    return send, client.aclose


async def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.worker == "raw":
        send, close = await make_raw_sender(args)
    else:
        send, close = await make_provider_sender(args, args.worker == "sipwake")
    try:
        rate, failures = await closed_loop(send, args.count, args.concurrency)
    finally:
        await close()
    return {"client": args.worker, "rate": rate, "failures": failures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        print(json.dumps(asyncio.run(worker(args))))
        return
    clients = [c for c in args.clients.split(",") if c]
    rates: dict[str, list[float]] = {c: [] for c in clients}
    nginx_sink.CONF_TEMPLATE = Path(__file__).with_name("nginx-fcm.conf")
    with tempfile.TemporaryDirectory() as tmp:
        sink = nginx_sink.NginxSink(Path(tmp))
        sink.start()
        try:
            for run in range(args.runs):
                for client in clients:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--worker",
                            client,
                            "--port",
                            str(sink.port),
                            "--ca",
                            str(sink.ca),
                            "--count",
                            str(args.count),
                            "--concurrency",
                            str(args.concurrency),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    if result["failures"]:
                        raise SystemExit(f"{client}: {result['failures']} pushes failed")
                    rates[client].append(result["rate"])
                    print(f"run {run + 1} {client:14} {result['rate']:8.0f} pushes/s", flush=True)
        finally:
            sink.stop()
    print(f"\nmedian of {args.runs} runs, {args.count} pushes each, {args.concurrency} in flight:")
    for client, values in rates.items():
        print(f"  {client:14} {statistics.median(values):8.0f} pushes/s")


if __name__ == "__main__":
    main()
