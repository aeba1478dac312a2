"""Throughput of the stores: bindings upserted/s and held MESSAGEs added/s.

Run: python3 bench/bench_store.py [--count 5000] [--concurrency 1 64 256]
     [--synchronous FULL NORMAL] [--dir DIR]
     python3 bench/bench_store.py --backend redis [--appendfsync always everysec]
     python3 bench/bench_store.py --backend redis --memory 100000

With ``--backend redis`` each run starts its own redis-server (appendonly yes, the given
``appendfsync``) in a temporary folder on a free 127.0.0.1 port. ``--memory N`` upserts N
bindings and prints the growth of this process's RSS (sipwake's own memory: the Redis
store keeps nothing per binding in the process) and of Redis's ``used_memory``, per binding.

Each run starts from an empty database in DIR (a temporary folder on the same disk as the
working directory by default: fsync on tmpfs would be free and prove nothing). It prints,
per synchronous mode and concurrency, writes per second, commits (group commit merges
concurrent writes into one transaction), and database bytes per stored binding. There is
no in-memory index: lookups go to SQLite, whose page cache is bounded (about 2 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sipwake.store import Binding, HeldMessage, Received, push_key_for
from sipwake.store.redis import RedisStore
from sipwake.store.sqlite import SqliteStore

PRID = "a1" * 32
REQUEST = (
    b"MESSAGE sip:bob@sip.example.org SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK776asdhds\r\n"
    b"From: <sip:alice@sip.example.org>;tag=1928301774\r\n"
    b"To: <sip:bob@sip.example.org>\r\nCall-ID: a84b4c76e66710\r\nCSeq: 1 MESSAGE\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 24\r\n\r\nHello, are you awake?..."
)


def binding(i: int, now: float) -> Binding:
    """A Linphone-like iOS binding with voip&remote tokens, one AOR per 2 devices."""
    contact = f"sip:user{i}@192.168.{i // 250 % 250}.{i % 250}:50312;transport=tcp"
    tokens = [f"{i:08x}{PRID[8:]}", f"{i:08x}{PRID[:56]}"]
    return Binding(
        aor=f"sip:user{i // 2}@sip.example.org",
        contact=contact,
        contact_header=f"<{contact};pn-provider=apns;pn-prid={tokens[0]}:voip&{tokens[1]}:remote>"
        f';+sip.instance="<urn:uuid:{i:08x}-1e0f-4a9b-8c7d-6e5f4a3b2c1d>";reg-id=1',
        registered_at=now,
        expires_at=now + 3600,
        instance_id=f"<urn:uuid:{i:08x}-1e0f-4a9b-8c7d-6e5f4a3b2c1d>",
        reg_id=1,
        call_id=f"call-{i}",
        cseq=21,
        path=["<sip:edge.example.org;lr>"],
        received=Received("tcp", "192.0.2.7", 50312, "tcp://0.0.0.0:5060"),
        user_agent="LinphoneiOS/5.2.3 (iPhone) LinphoneSDK/5.3.0",
        push={"pn-provider": "apns", "pn-param": "ABCD1234.org.linphone.phone.voip&remote"},
        push_key=push_key_for("apns", tokens),
    )


async def run(work: Callable[[int], Awaitable[object]], count: int, concurrency: int) -> float:
    """Run ``work(i)`` for i < count with ``concurrency`` calls in flight; returns seconds."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < count:
            i = next_i
            next_i += 1
            await work(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


def db_bytes(db: Path) -> int:
    """Size of the database once its WAL is folded in."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return db.stat().st_size


async def bench(base: Path, sync: str, count: int, concurrency: int) -> None:
    folder = Path(tempfile.mkdtemp(dir=base))
    try:
        now = time.time()
        db = folder / "bindings.db"
        async with await SqliteStore.open(db, folder, synchronous=sync) as store:
            c0 = store.commits
            secs = await run(lambda i: store.bindings.upsert(binding(i, now)), count, concurrency)
            print(
                f"{sync:6} c={concurrency:<4} bindings upserted/s {count / secs:8.0f}"
                f"  commits {store.commits - c0:5}"
                f"  ({count // 2} AORs, 2 push devices each)"
            )
            stored = await store.bindings.count()
        per = db_bytes(db) / stored
        db = folder / "messages.db"
        async with await SqliteStore.open(db, folder, synchronous=sync) as store:

            def held(i: int) -> Awaitable[str]:
                aor = f"sip:user{i % 100}@sip.example.org"
                return store.messages.add(HeldMessage(aor, REQUEST, now, now + 3600))

            c0 = store.commits
            secs = await run(held, count, concurrency)
            print(
                f"{sync:6} c={concurrency:<4} messages added/s    {count / secs:8.0f}"
                f"  commits {store.commits - c0:5}"
            )
        print(f"{sync:6} c={concurrency:<4} database bytes per binding {per:.0f}")
    finally:
        shutil.rmtree(folder)


class Redis:
    """A redis-server of one run, in ``folder``, stopped by PID."""

    def __init__(self, folder: Path, appendfsync: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        conf = folder / "redis.conf"
        conf.write_text(
            f'bind 127.0.0.1\nport {self.port}\ndir {folder}\nsave ""\n'
            f"appendonly yes\nappendfsync {appendfsync}\nlogfile {folder}/redis.log\n"
        )
        self.proc = subprocess.Popen(["redis-server", str(conf)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True
        )
        return out.stdout.strip()

    def used_memory(self) -> int:
        for line in self.cli("INFO", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise SystemExit("no used_memory in INFO")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def rss() -> int:
    """Resident set size of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


async def bench_redis(base: Path, fsync: str, count: int, concurrency: int) -> None:
    folder = Path(tempfile.mkdtemp(dir=base))
    server = Redis(folder, fsync)
    try:
        now = time.time()
        url = f"redis://127.0.0.1:{server.port}/0"
        async with await RedisStore.open(url, folder) as store:
            b0 = store.batches
            secs = await run(lambda i: store.bindings.upsert(binding(i, now)), count, concurrency)
            print(
                f"{fsync:8} c={concurrency:<4} bindings upserted/s {count / secs:8.0f}"
                f"  batches {store.batches - b0:5}"
            )

            def held(i: int) -> Awaitable[str]:
                aor = f"sip:user{i % 100}@sip.example.org"
                return store.messages.add(HeldMessage(aor, REQUEST, now, now + 3600))

            b0 = store.batches
            secs = await run(held, count, concurrency)
            print(
                f"{fsync:8} c={concurrency:<4} messages added/s    {count / secs:8.0f}"
                f"  batches {store.batches - b0:5}"
            )
    finally:
        server.stop()
        shutil.rmtree(folder)


async def memory(base: Path, count: int) -> None:
    """RSS of this process and Redis used_memory per binding, at ``count`` bindings."""
    folder = Path(tempfile.mkdtemp(dir=base))
    server = Redis(folder, "everysec")
    try:
        now = time.time()
        url = f"redis://127.0.0.1:{server.port}/0"
        async with await RedisStore.open(url, folder) as store:
            await run(lambda i: store.bindings.upsert(binding(i, now)), 2000, 64)  # warm up
            gc.collect()
            rss0, redis0 = rss(), server.used_memory()
            await run(lambda i: store.bindings.upsert(binding(i + 2000, now)), count, 256)
            gc.collect()
            stored = await store.bindings.count()
            grown, redis_grown = rss() - rss0, server.used_memory() - redis0
            print(
                f"{stored} bindings in Redis; sipwake process RSS grew {grown / 1e6:.1f} MB"
                f" = {grown / count:.0f} bytes per binding; Redis used_memory grew"
                f" {redis_grown / 1e6:.1f} MB = {redis_grown / count:.0f} bytes per binding"
            )
    finally:
        server.stop()
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--synchronous", nargs="+", default=["FULL", "NORMAL"])
    parser.add_argument("--appendfsync", nargs="+", default=["always", "everysec"])
    parser.add_argument("--memory", type=int, default=0, metavar="N")
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    if args.memory:
        asyncio.run(memory(args.dir, args.memory))
        return
    if args.backend == "redis":
        for fsync in args.appendfsync:
            for conc in args.concurrency:
                asyncio.run(bench_redis(args.dir, fsync, args.count, conc))
        return
    for sync in args.synchronous:
        for conc in args.concurrency:
            asyncio.run(bench(args.dir, sync, args.count, conc))


if __name__ == "__main__":
    main()
