"""APNs pushes per second from one process: sipwake vs aioapns against the same nginx sink.

Starts nginx (TLS, ALPN h2, one worker, 1000 concurrent streams, echoing ``apns-id``) on
127.0.0.1, then runs each client in its own fresh process, alternating, and reports the
median pushes/s of each and their ratio; then the submit→answer latency of sipwake at half
its median rate with an open-loop (paced) sender. nginx is stopped by its PID at the end.

    python3 bench/bench_apns.py                       # the figures in docs/benchmarks.md
    python3 bench/bench_apns.py --clients sipwake,sipwake-raw,h2,jh2,aioapns   # candidates
    python3 bench/bench_apns.py --rounds 2 --clients sipwake-raw,pyreqwest,rnet,pycurl
    python3 bench/bench_apns.py --clients sipwake,sipwake@base --baseline-src /tmp/old/src

Clients: ``sipwake`` is the real APNs provider (payload, JWT, result mapping) over
:class:`sipwake.push.http2.Http2Client`; ``sipwake-service`` is the same through
:class:`sipwake.push.service.PushService` (provider choice, queue bound, stats), the way
the SIP side and the HTTP API send; ``sipwake-raw`` is the bare Http2Client with a
prepared request; ``h2``/``jh2`` are a minimal client on the ``h2`` state machine (or its
``jh2`` fork) as the measured alternative; ``aioapns`` is aioapns 4 (the reference);
``pyreqwest`` and ``rnet`` are Rust-backed clients (install them by hand to compare);
``pycurl`` is libcurl's multi interface with HTTP/2 multiplexing. A client named
``NAME@base`` runs ``NAME`` on the sipwake sources under ``--baseline-src`` (for example
an export of an older commit) to compare two versions in one run, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nginx_sink import NginxSink

TOPIC = "org.example.app"
KEY_ID = "ABC123DEFG"
TEAM_ID = "DEF123GHIJ"


def token(i: int) -> str:
    return f"{i:064x}"


def payload() -> dict[str, Any]:
    """An incoming-call VoIP payload of about 200 bytes, as sipwake's provider sends."""
    return {
        "aps": {"alert": {"loc-key": "IC_MSG", "loc-args": ["Alice"]}, "sound": "default"},
        "from-uri": "sip:alice@example.org",
        "display-name": "Alice",
        "call-id": "a84b4c76e66710-" + "0" * 30,
        "pn_ttl": 30,
        "uuid": str(uuid.UUID(int=1)),
    }


# --- workers (each runs in its own process) ----------------------------------------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def closed_loop(send: Any, count: int, concurrency: int) -> tuple[float, float, int]:
    """Keep ``concurrency`` pushes in flight until ``count`` are answered.

    Returns (pushes per wall second, pushes per CPU second of this process, failures).
    The CPU figure is what one process reaches with a core of its own: the shared
    machines here are too noisy for wall-clock rates alone.
    """
    numbers = iter(range(min(count, 2000)))  # warm-up: connect, fill tables and caches
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for i in numbers:
            if not await send(i):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, 200))))  # warm-up
    numbers = iter(range(count))
    start = time.perf_counter()
    cpu = cpu_seconds()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = cpu_seconds() - cpu
    return count / (time.perf_counter() - start), count / cpu, failures


async def open_loop(send: Any, rate: float, seconds: float) -> dict[str, float]:
    """Submit at a fixed rate regardless of answers; latency from the planned submit time."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures = 0
    tasks: set[asyncio.Task[None]] = set()

    slow: list[float] = []  # when (seconds into the run) answers took over 20 ms

    async def one(i: int, planned: float) -> None:
        nonlocal failures
        ok = await send(i)
        took = loop.time() - planned
        latencies.append(took)
        if took > 0.02:
            slow.append(planned - start)
        failures += not ok

    total = int(rate * seconds)
    start = loop.time()
    sent = 0
    while sent < total:
        now = loop.time()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            t = loop.create_task(one(sent, start + sent / rate))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
    while tasks:
        await asyncio.gather(*list(tasks))
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "rate": rate,
        "achieved": total / (loop.time() - start),
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[int(len(ms) * 0.99)],
        "max_ms": ms[-1],
        "failures": failures,
        "slow_from_s": slow[0] if slow else None,
        "slow_to_s": slow[-1] if slow else None,
    }


def write_key(directory: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / "AuthKey.p8"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def make_sipwake_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    from sipwake.push.providers.apns import ApnsProvider, ApnsSettings
    from sipwake.push.request import Destination, Provider, PushKind, PushRequest, Service

    key = write_key(Path(args.dir))
    settings = ApnsSettings(
        key_file=str(key),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        server=f"https://127.0.0.1:{args.port}",
        ca_file=args.ca,
    )
    provider = ApnsProvider(settings)

    async def send(i: int) -> bool:
        dest = Destination(Provider.APNS, TOPIC, token(i), Service.VOIP)
        request = PushRequest(
            dest,
            PushKind.CALL,
            call_id=f"a84b4c76e66710-{i}",
            from_uri="sip:alice@example.org",
            display_name="Alice",
        )
        return (await provider.send(request)).ok

    return send, provider.aclose


async def make_service_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    from sipwake.push.providers.apns import ApnsProvider, ApnsSettings
    from sipwake.push.request import Destination, Provider, PushKind, PushRequest, Service
    from sipwake.push.service import PushService

    key = write_key(Path(args.dir))
    settings = ApnsSettings(
        key_file=str(key),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        server=f"https://127.0.0.1:{args.port}",
        ca_file=args.ca,
    )
    service = PushService([ApnsProvider(settings)], max_queue_size=args.concurrency * 2)

    async def send(i: int) -> bool:
        dest = Destination(Provider.APNS, TOPIC, token(i), Service.VOIP)
        request = PushRequest(
            dest,
            PushKind.CALL,
            call_id=f"a84b4c76e66710-{i}",
            from_uri="sip:alice@example.org",
            display_name="Alice",
        )
        return (await service.send(request)).ok

    return send, service.aclose


async def make_raw_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    from sipwake.push.http2 import Http2Client

    ctx = ssl.create_default_context(cafile=args.ca)
    client = Http2Client(f"https://127.0.0.1:{args.port}", ssl_context=ctx)
    body = json.dumps(payload(), separators=(",", ":")).encode()
    headers = [
        ("authorization", "bearer " + "e" * 160),  # an ES256 JWT is about this long
        ("apns-topic", TOPIC + ".voip"),
        ("apns-push-type", "voip"),
        ("apns-priority", "10"),
        ("apns-expiration", "0"),
    ]

    async def send(i: int) -> bool:
        apns_id = str(uuid.uuid4())
        resp = await client.request(
            "POST", f"/3/device/{token(i)}", [*headers, ("apns-id", apns_id)], body
        )
        return resp.status == 200 and resp.headers.get("apns-id") == apns_id

    return send, client.aclose


async def make_h2_sender(args: argparse.Namespace, module: str) -> tuple[Any, Any]:
    """A minimal, correct-enough client on the h2 (or jh2) state machine: the baseline."""
    h2 = __import__(module + ".connection", fromlist=["x"])
    h2config = __import__(module + ".config", fromlist=["x"])
    h2events = __import__(module + ".events", fromlist=["x"])
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["h2"])
    conn = h2.H2Connection(h2config.H2Configuration(client_side=True, header_encoding="utf-8"))
    waiters: dict[int, asyncio.Future[int]] = {}
    statuses: dict[int, int] = {}
    ready = loop.create_future()
    slots = asyncio.Semaphore(100)
    flush_pending = False

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            conn.initiate_connection()
            transport.write(conn.data_to_send())

        def data_received(self, data: bytes) -> None:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2events.RemoteSettingsChanged) and not ready.done():
                    ready.set_result(None)
                elif isinstance(ev, h2events.ResponseReceived):
                    statuses[ev.stream_id] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2events.StreamEnded):
                    fut = waiters.pop(ev.stream_id)
                    fut.set_result(statuses.pop(ev.stream_id, 0))
            self.t.write(conn.data_to_send())

    transport, _proto = await loop.create_connection(
        Proto, "127.0.0.1", args.port, ssl=ctx, server_hostname="127.0.0.1"
    )
    await ready
    body = json.dumps(payload(), separators=(",", ":")).encode()

    def flush() -> None:
        nonlocal flush_pending
        flush_pending = False
        transport.write(conn.data_to_send())

    async def send(i: int) -> bool:
        nonlocal flush_pending
        async with slots:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":authority", f"127.0.0.1:{args.port}"),
                    (":path", f"/3/device/{token(i)}"),
                    ("authorization", "bearer " + "e" * 160),
                    ("apns-topic", TOPIC + ".voip"),
                    ("apns-push-type", "voip"),
                    ("apns-id", str(uuid.uuid4())),
                ],
            )
            conn.send_data(sid, body, end_stream=True)
            fut = loop.create_future()
            waiters[sid] = fut
            if not flush_pending:
                flush_pending = True
                loop.call_soon(flush)
            return await fut == 200

    async def close() -> None:
        transport.close()

    return send, close


async def make_aioapns_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsProductionClientProtocol

    class LocalProtocol(APNsProductionClientProtocol):
        APNS_SERVER = "127.0.0.1"
        APNS_PORT = args.port

    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.set_alpn_protocols(["h2"])
    key = write_key(Path(args.dir)).read_text()
    client = APNs(
        key=key,
        key_id=KEY_ID,
        team_id=TEAM_ID,
        topic=TOPIC + ".voip",
        ssl_context=ctx,
        max_connections=1,
    )
    client.pool.protocol_class = LocalProtocol
    message = payload()

    async def send(i: int) -> bool:
        request = NotificationRequest(
            device_token=token(i), message=message, push_type=PushType.VOIP
        )
        return bool((await client.send_notification(request)).is_successful)

    async def close() -> None:
        client.pool.close()

    return send, close


async def make_pyreqwest_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    """pyreqwest (Rust reqwest/hyper) with HTTP/2 over one connection: a candidate."""
    from pyreqwest.client import ClientBuilder

    ca_pem = Path(args.ca).read_bytes()  # noqa: ASYNC240 - before any push is sent
    builder = ClientBuilder().add_root_certificate_pem(ca_pem)
    client = builder.http2(True).max_connections(1).build()
    body = json.dumps(payload(), separators=(",", ":")).encode()
    url = f"https://127.0.0.1:{args.port}/3/device/"

    async def send(i: int) -> bool:
        request = (
            client.post(url + token(i))
            .header("authorization", "bearer " + "e" * 160)
            .header("apns-topic", TOPIC + ".voip")
            .header("apns-push-type", "voip")
            .header("apns-id", str(uuid.uuid4()))
            .body_bytes(body)
            .build()
        )
        return bool((await request.send()).status == 200)

    async def close() -> None:
        await client.close()

    return send, close


async def make_rnet_sender(args: argparse.Namespace) -> tuple[Any, Any]:
    """rnet (Rust wreq/hyper), HTTP/2 only, one connection: a candidate."""
    import rnet

    client = rnet.Client(http2_only=True, verify=Path(args.ca), pool_max_size=1)
    body = json.dumps(payload(), separators=(",", ":")).encode()
    url = f"https://127.0.0.1:{args.port}/3/device/"
    headers = {
        "authorization": "bearer " + "e" * 160,
        "apns-topic": TOPIC + ".voip",
        "apns-push-type": "voip",
    }

    async def send(i: int) -> bool:
        response = await client.post(
            url + token(i), headers={**headers, "apns-id": str(uuid.uuid4())}, body=body
        )
        return str(response.status).startswith("200")

    async def close() -> None:
        return None

    return send, close


def pycurl_closed_loop(args: argparse.Namespace) -> dict[str, Any]:
    """pycurl's multi interface, HTTP/2 multiplexed on one connection, in its own loop.

    No asyncio integration at all (that would only add cost): the ceiling for libcurl
    driven from Python.
    """
    import pycurl

    body = json.dumps(payload(), separators=(",", ":")).encode()
    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
    multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, 1)
    if hasattr(pycurl, "M_MAX_CONCURRENT_STREAMS"):
        multi.setopt(pycurl.M_MAX_CONCURRENT_STREAMS, 1000)
    url = f"https://127.0.0.1:{args.port}/3/device/"
    failures = 0

    def start(handle: Any, i: int) -> None:
        handle.setopt(pycurl.URL, url + token(i))
        handle.setopt(
            pycurl.HTTPHEADER,
            [
                "authorization: bearer " + "e" * 160,
                f"apns-topic: {TOPIC}.voip",
                "apns-push-type: voip",
                f"apns-id: {uuid.uuid4()}",
            ],
        )
        multi.add_handle(handle)

    def make() -> Any:
        handle = pycurl.Curl()
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2TLS)
        handle.setopt(pycurl.PIPEWAIT, 1)
        handle.setopt(pycurl.CAINFO, args.ca)
        handle.setopt(pycurl.POSTFIELDS, body)
        handle.setopt(pycurl.WRITEFUNCTION, lambda data: None)
        return handle

    def run(count: int) -> float:
        nonlocal failures
        handles = [make() for _ in range(min(args.concurrency, count))]
        started = 0
        for h in handles:
            start(h, started)
            started += 1
        done = 0
        t0 = time.perf_counter()
        while done < count:
            while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            _queued, ok, failed = multi.info_read()
            for h in ok + [f[0] for f in failed]:
                multi.remove_handle(h)
                if h in ok and h.getinfo(pycurl.RESPONSE_CODE) != 200:
                    failures += 1
                done += 1
                if started < count:
                    start(h, started)
                    started += 1
            failures += len(failed)
            if done < count:
                wait = multi.timeout()
                if wait != 0:
                    multi.select(1.0 if wait < 0 else wait / 1000)
        return count / (time.perf_counter() - t0)

    run(min(args.count, 2000))
    cpu = cpu_seconds()
    rate = run(args.count)
    return {"rate": rate, "cpu_rate": args.count / (cpu_seconds() - cpu), "failures": failures}


SENDERS: dict[str, Any] = {
    "sipwake": make_sipwake_sender,
    "sipwake-service": make_service_sender,
    "sipwake-raw": make_raw_sender,
    "h2": lambda a: make_h2_sender(a, "h2"),
    "jh2": lambda a: make_h2_sender(a, "jh2"),
    "aioapns": make_aioapns_sender,
    "pyreqwest": make_pyreqwest_sender,
    "rnet": make_rnet_sender,
    "pycurl": None,  # not asyncio: see pycurl_closed_loop
}


async def worker_main(args: argparse.Namespace) -> dict[str, Any]:
    send, close = await SENDERS[args.worker](args)
    try:
        if args.rate:
            # Connect, sign the JWT and fill the HPACK tables first: the latency asked
            # for is that of a long-lived connection.
            for i in range(200):
                await send(i)
            return await open_loop(send, args.rate, args.seconds)
        rate, cpu_rate, failures = await closed_loop(send, args.count, args.concurrency)
        return {"rate": rate, "cpu_rate": cpu_rate, "failures": failures}
    finally:
        await close()


def run_worker(name: str, sink: NginxSink, args: argparse.Namespace, **extra: Any) -> Any:
    worker, _, variant = name.partition("@")
    env = None
    if variant == "base":
        env = {**os.environ, "PYTHONPATH": args.baseline_src}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--port",
        str(sink.port),
        "--ca",
        str(sink.ca),
        "--dir",
        str(sink.dir),
        "--concurrency",
        str(args.concurrency),
        "--count",
        str(extra.get("count", args.count)),
        "--loop",
        args.loop,
    ]
    if "rate" in extra:
        cmd += ["--rate", str(extra["rate"]), "--seconds", str(args.seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{name} worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="sipwake,aioapns")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=30000, help="pushes per throughput run")
    parser.add_argument("--concurrency", type=int, default=500, help="pushes in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=0.0,
        help="pushes/s of the latency run (default: half the median sipwake rate)",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--baseline-src",
        default="",
        help="sipwake sources (the directory holding sipwake/) run by clients named NAME@base",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "pycurl":
            result = pycurl_closed_loop(args)
        elif args.loop == "uvloop":
            import uvloop

            result = uvloop.run(worker_main(args))
        else:
            result = asyncio.run(worker_main(args))
        print(json.dumps(result), flush=True)
        # Some Rust-backed clients crash while the interpreter shuts down; the figures
        # are out by now, so skip the finalisation.
        os._exit(0)

    clients = args.clients.split(",")
    unknown = [c for c in clients if c.partition("@")[0] not in SENDERS]
    unknown += [c for c in clients if c.partition("@")[2] not in ("", "base")]
    if unknown:
        parser.error(f"--clients: unknown client(s) {', '.join(unknown)}")
    if any(c.endswith("@base") for c in clients) and not args.baseline_src:
        parser.error("clients named NAME@base need --baseline-src")
    with tempfile.TemporaryDirectory(prefix="sipwake-bench-") as tmp:
        sink = NginxSink(Path(tmp))
        sink.start()
        try:
            print(f"nginx sink pid {sink.proc.pid if sink.proc else '?'} on 127.0.0.1:{sink.port}")
            print(f"python {sys.version.split()[0]}, loop {args.loop}, {os.cpu_count()} cores")
            rates: dict[str, list[float]] = {c: [] for c in clients}
            cpu_rates: dict[str, list[float]] = {c: [] for c in clients}
            for r in range(args.rounds):
                order = clients if r % 2 == 0 else clients[::-1]
                for name in order:
                    count = args.count if name.startswith("sipwake") else args.count // 3
                    res = run_worker(name, sink, args, count=count)
                    rates[name].append(res["rate"])
                    cpu_rates[name].append(res["cpu_rate"])
                    print(
                        f"round {r + 1} {name:16s} {res['rate']:9.0f} pushes/s"
                        f" {res['cpu_rate']:9.0f} pushes/CPU-s"
                        f" ({count} pushes, {res['failures']} failed,"
                        f" load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            medians = {c: statistics.median(v) for c, v in rates.items()}
            cpu_medians = {c: statistics.median(v) for c, v in cpu_rates.items()}
            print("\nmedians:        pushes/s  pushes/CPU-s")
            for c in clients:
                print(f"  {c:16s} {medians[c]:9.0f} {cpu_medians[c]:13.0f}")
            if "sipwake" in medians and "aioapns" in medians:
                print(
                    f"  ratio sipwake / aioapns: {medians['sipwake'] / medians['aioapns']:.2f}"
                    f" (wall), {cpu_medians['sipwake'] / cpu_medians['aioapns']:.2f} (CPU)"
                )
            for c in clients:
                base = c + "@base"
                if "@" not in c and base in medians:
                    print(
                        f"  ratio {c} / {base}: {medians[c] / medians[base]:.2f}"
                        f" (wall), {cpu_medians[c] / cpu_medians[base]:.2f} (CPU)"
                    )
            if "sipwake" in medians:
                half = args.latency_rate or medians["sipwake"] / 2
                lat = run_worker("sipwake", sink, args, rate=round(half))
                print(
                    f"\nsipwake at {lat['rate']:.0f} pushes/s offered"
                    f" ({lat['achieved']:.0f} achieved, {args.seconds:g} s, open loop):"
                    f" p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms,"
                    f" max {lat['max_ms']:.1f} ms, {lat['failures']} failed"
                    f" (load {os.getloadavg()[0]:.1f})"
                )
                if lat["achieved"] < 0.95 * lat["rate"]:
                    print("  the process could not keep up: the machine was busier than")
                    print("  during the throughput runs, so these latencies are queueing")
        finally:
            sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
