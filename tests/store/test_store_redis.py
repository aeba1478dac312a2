"""What is particular to the Redis backend: URLs, server-side expiry, several nodes on one
Redis, registration events, and Redis or a node dying under traffic."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.config import ConfigError
from sipwake.store import Binding, HeldMessage, StoreUnavailable, open_url, parse_url
from sipwake.store.redis import GRACE_MS, RedisStore, parse_redis_url
from tests.conftest import free_port
from tests.store.redis_server import RedisServer, SentinelServer
from tests.store.test_store_bindings import make

HERE = Path(__file__).parent
AOR = "sip:alice@example.com"
T0 = 1_767_225_600.0


@pytest.fixture
async def nodes(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[list[RedisStore]]:
    """Two stores on one Redis and one prefix: two sipwake nodes of a cluster."""
    url = f"{redis_server.url}?prefix=n{free_port()}:"
    stores = [await RedisStore.open(url, tmp_path / f"node{i}") for i in range(2)]
    yield stores
    for s in stores:
        await s.close()


def test_urls_are_checked_when_the_config_is_read(tmp_path: Path) -> None:
    assert parse_url("redis://127.0.0.1:6379/0?prefix=a:", tmp_path).backend == "redis"
    assert parse_url("redis+sentinel://h1:26379,h2:26379/svc/2", tmp_path).backend == "redis"
    s = parse_redis_url("redis+sentinel://:pw@h1:26379,[::1]:26380/mymaster/3?prefix=x:")
    assert s.sentinels == (("h1", 26379), ("::1", 26380))
    assert (s.service, s.db, s.password, s.prefix) == ("mymaster", 3, "pw", "x:")
    for bad in (
        "redis://",
        "redis+sentinel://h1:26379",
        "redis+sentinel://h1/svc",
        "redis+sentinel://h1:1/svc/db",
        "redis://h:1/0?prefix=",
    ):
        with pytest.raises(ConfigError, match=r"\[storage\] url"):
            parse_url(bad, tmp_path)


async def test_unreachable_redis_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="Redis unavailable"):
        await open_url(f"redis://127.0.0.1:{free_port()}/0", tmp_path)


async def test_redis_forgets_expired_bindings_and_messages_by_itself(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Server-side expiry: keys carry the binding's (message's) lifetime plus the grace."""
    prefix = f"x{free_port()}:"
    async with await RedisStore.open(f"{redis_server.url}?prefix={prefix}", tmp_path) as store:
        await store.bindings.upsert(make("sip:alice@10.0.0.1", expires=60))
        await store.bindings.upsert(make("sip:alice@10.0.0.2", expires=600, tokens=("TOK",)))
        await store.messages.add(HeldMessage(AOR, b"MESSAGE", T0, T0 + 300, id="m1"))
    ttl = int(redis_server.cli("PTTL", f"{prefix}b:{AOR}"))
    assert 600_000 < ttl <= 600_000 + GRACE_MS  # the longest binding decides
    ttl = int(redis_server.cli("PTTL", f"{prefix}t:apns TOK"))
    assert 600_000 < ttl <= 600_000 + GRACE_MS
    ttl = int(redis_server.cli("PTTL", f"{prefix}m:m1"))
    assert 300_000 < ttl <= 300_000 + GRACE_MS


async def test_nodes_registering_at_once_keep_every_rule(nodes: list[RedisStore]) -> None:
    """Two nodes, 60 concurrent REGISTERs of one AOR: the Lua scripts keep them atomic."""
    a, b = nodes
    uploads = [
        (a if i % 2 else b).bindings.upsert(
            make(f"sip:alice@10.0.0.{i}", at=T0 + i, tokens=(f"T{i % 7}",)), max_push_devices=3
        )
        for i in range(60)
    ]
    await asyncio.gather(*uploads)
    for store in nodes:
        now = await store.bindings.get(AOR)
        assert len({x.device for x in now}) == len(now) <= 3
        tokens = [t for x in now for t in (x.push_tokens or ("", ()))[1]]
        assert len(tokens) == len(set(tokens))  # one device per token
        assert await store.bindings.count() == len(now)


async def test_a_message_is_delivered_once_by_racing_nodes(nodes: list[RedisStore]) -> None:
    a, b = nodes
    mid = await a.messages.add(HeldMessage(AOR, b"MESSAGE", T0, T0 + 60))
    results = await asyncio.gather(*(s.messages.delete(mid) for s in (a, b, a, b)))
    assert sorted(results) == [False, False, False, True]


async def test_registration_through_one_node_reaches_the_others(
    nodes: list[RedisStore],
) -> None:
    a, b = nodes
    seen_a: asyncio.Queue[tuple[str, Binding]] = asyncio.Queue()
    seen_b: list[tuple[str, Binding]] = []
    a.watch_bindings(lambda kind, binding: seen_a.put_nowait((kind, binding)))
    b.watch_bindings(lambda kind, binding: seen_b.append((kind, binding)))
    await asyncio.gather(a.wait_watching(), b.wait_watching())
    first = make("sip:alice@10.0.0.9", tokens=("TOK",))
    await b.bindings.upsert(first)
    assert await seen_a.get() == ("added", first)
    again = make("sip:alice@10.0.0.9", at=T0 + 5, tokens=("TOK",))
    await b.bindings.upsert(again)
    assert await seen_a.get() == ("refreshed", again)
    await a.bindings.upsert(make("sip:alice@10.0.0.8", at=T0 + 6))
    # b hears a's registration; a never hears its own.
    while not seen_b:
        await b.bindings.count()  # one round trip lets the event arrive
    assert [(k, x.contact) for k, x in seen_b] == [("added", "sip:alice@10.0.0.8")]
    assert seen_a.empty()


async def test_redis_killed_and_restarted_under_traffic_loses_nothing_acknowledged(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Writers keep going while Redis is SIGKILLed and restarted on the same data.

    While it is down every write fails fast with StoreUnavailable (the registrar's 503);
    afterwards the same store object works again, and every write it acknowledged, before
    or after, is there. The subscription to registrations comes back by itself.
    """
    store = await RedisStore.open(own_redis.url, tmp_path)
    store.watch_bindings(lambda kind, binding: None)
    other = await RedisStore.open(own_redis.url, tmp_path / "other")
    heard: asyncio.Queue[Binding] = asyncio.Queue()
    other.watch_bindings(lambda kind, binding: heard.put_nowait(binding))
    await other.wait_watching()
    acked_bindings: list[Binding] = []
    acked_messages: dict[str, bytes] = {}
    failures: list[Exception] = []
    phase = {"acked": asyncio.Event(), "failed": asyncio.Event(), "back": asyncio.Event()}
    stop = False
    counter = 0
    target = 200  # acknowledged writes to reach before the next phase

    async def writer() -> None:
        nonlocal counter
        while not stop:
            counter += 1
            i = counter
            try:
                if i % 2:
                    body = b"MESSAGE %d" % i
                    held = HeldMessage("sip:bob@example.com", body, T0, 1e12)
                    mid = await store.messages.add(held)
                    acked_messages[mid] = body
                else:
                    b = make(f"sip:u@10.0.0.1:{i}", aor=f"sip:u{i}@example.com", expires=1e9)
                    await store.bindings.upsert(b)
                    acked_bindings.append(b)
            except StoreUnavailable as exc:
                failures.append(exc)
                phase["failed"].set()
                await asyncio.sleep(0.01)  # a client's retry back-off, not synchronisation
                continue
            if len(acked_bindings) + len(acked_messages) >= target:
                (phase["back"] if phase["failed"].is_set() else phase["acked"]).set()

    tasks = [asyncio.create_task(writer()) for _ in range(8)]
    try:
        await phase["acked"].wait()
        own_redis.kill()
        await phase["failed"].wait()
        target = len(acked_bindings) + len(acked_messages) + 100
        own_redis.start()
        await phase["back"].wait()  # 100 more writes acknowledged by the restarted Redis
    finally:
        stop = True
        await asyncio.gather(*tasks)
    assert failures and all(isinstance(f, StoreUnavailable) for f in failures)
    # Nothing acknowledged is lost: read back through a fresh connection after a restart.
    own_redis.kill()
    own_redis.start()
    async with await RedisStore.open(own_redis.url, tmp_path) as check:
        held = {m.id: m.request for m in await check.messages.pending("sip:bob@example.com")}
        assert acked_messages.items() <= held.items()
        for b in acked_bindings:
            assert await check.bindings.get(b.aor) == [b]
    # The other node's subscription came back: it hears a registration made now. (Like
    # the registrar, the writing node watches too, which renews its dead connections.)
    while not heard.empty():
        heard.get_nowait()
    await asyncio.gather(other.wait_watching(), store.wait_watching())
    late = make("sip:late@10.0.0.1", aor="sip:late@example.com")
    for attempt in range(3):  # as a SIP client retries after 503
        try:
            await store.bindings.upsert(late)
            break
        except StoreUnavailable:
            assert attempt < 2
    assert await heard.get() == late
    await store.close()
    await other.close()


def test_kill_9_of_a_node_holding_messages_then_another_node_delivers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A node is SIGKILLed mid-stream; another node of the cluster finds every MESSAGE
    the dead one acknowledged (202) and every binding it acknowledged (200)."""
    url = f"{redis_server.url}?prefix=k{free_port()}:"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "store_writer_proc.py"), url, str(tmp_path / "a")],
        stdout=subprocess.PIPE,
    )
    acked: list[str] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 400:
            line = proc.stdout.readline()
            assert line, f"writer exited with {proc.poll()}"
            acked.append(line.decode().strip())
        os.kill(proc.pid, signal.SIGKILL)
        acked += [ln.strip() for ln in proc.stdout.read().decode().splitlines()]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    messages = {a.split()[1] for a in acked if a.startswith("message ")}
    aors = {a.split()[1] for a in acked if a.startswith("binding ")}
    assert messages and aors

    async def other_node() -> None:
        async with await RedisStore.open(url, tmp_path / "b") as store:
            held = {m.id: m for m in await store.messages.pending("sip:bob@example.com")}
            assert messages <= held.keys()
            for mid in messages:
                assert held[mid].request == f"MESSAGE {mid[1:]}".encode()
                assert await store.messages.delete(mid) is True  # delivered once
            for aor in aors:
                assert len(await store.bindings.get(aor)) == 1

    asyncio.run(other_node())


async def test_sentinel_finds_the_primary(redis_server: RedisServer, tmp_path: Path) -> None:
    """``redis+sentinel://`` with a real redis-sentinel monitoring the test's Redis."""
    sentinel = SentinelServer(tmp_path / "sentinel", redis_server.port)
    sentinel.start()
    try:
        prefix = f"s{sentinel.port}:"
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/primary/0?prefix={prefix}"
        async with await RedisStore.open(url, tmp_path / "data") as store:
            b = make("sip:alice@10.0.0.1")
            await store.bindings.upsert(b)
            assert await store.bindings.get(AOR) == [b]
        assert redis_server.cli("HLEN", f"{prefix}b:{AOR}") == "1"
    finally:
        sentinel.kill()


async def test_register_is_503_with_retry_after_while_redis_is_down(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The registrar on Redis: 200, then 503 + Retry-After while Redis is down (nothing
    acknowledged), then 200 again on the same store once Redis is back; a registration
    through a second registrar (node) reaches the first one's listeners as remote."""
    from sipwake.clock import FakeClock
    from sipwake.proxy.registrar import BindingEvent, Registrar
    from tests.proxy.test_registrar import SOURCE, make_config, register

    node_a = await RedisStore.open(own_redis.url, tmp_path / "a")
    node_b = await RedisStore.open(own_redis.url, tmp_path / "b")
    reg_a = Registrar(make_config(), node_a, clock=FakeClock())
    reg_b = Registrar(make_config(), node_b, clock=FakeClock())
    heard: asyncio.Queue[BindingEvent] = asyncio.Queue()
    reg_a.add_listener(heard.put_nowait)
    reg_a.start()
    try:
        await node_a.wait_watching()
        r = await reg_b.handle_register(register(["<sip:alice@10.0.0.1:5062>"]), SOURCE)
        assert r.status == 200
        event = await heard.get()
        assert (event.kind, event.aor, event.remote) == ("added", "sip:alice@example.org", True)
        own_redis.kill()
        r = await reg_b.handle_register(register(["<sip:alice@10.0.0.2:5062>"]), SOURCE)
        assert (r.status, r.headers.get("retry-after")) == (503, "5")
        own_redis.start()
        r = await reg_b.handle_register(register(["<sip:alice@10.0.0.3:5062>"]), SOURCE)
        assert r.status == 200
        contacts = {c.uri.to_string() for c in r.contacts}
        assert contacts == {"sip:alice@10.0.0.1:5062", "sip:alice@10.0.0.3:5062"}
    finally:
        await reg_a.aclose()
        await node_a.close()
        await node_b.close()


def test_the_documented_redis_conf_gives_the_safe_settings(tmp_path: Path) -> None:
    """docs/cluster.md's redis.conf block, loaded by a real redis-server."""
    doc = (HERE.parent.parent / "docs" / "cluster.md").read_text()
    start = doc.index("```conf\n# redis.conf for a sipwake cluster") + len("```conf\n")
    block = doc[start : doc.index("```", start)]
    server = RedisServer(tmp_path / "redis", extra=block)
    server.start()
    try:
        for name, value in (
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "noeviction"),
        ):
            assert server.cli("CONFIG", "GET", name).split("\n") == [name, value]
    finally:
        server.kill()


async def test_upsert_returns_the_aors_live_bindings(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """What the registrar lists in its 200 OK without a second read: get(aor, now)."""
    url = f"{redis_server.url}?prefix=u{free_port()}:"
    async with await RedisStore.open(url, tmp_path) as store:
        await store.bindings.upsert(make("sip:alice@10.0.0.1", expires=60))
        for i in range(2, 6):
            b = make(f"sip:alice@10.0.0.{i}", at=T0 + 100 + i, tokens=(f"T{i}",))
            result = await store.bindings.upsert(b, max_push_devices=3)
            assert result.bindings == await store.bindings.get(AOR, now=T0 + 100 + i)
        assert result.bindings is not None and len(result.bindings) == 3


async def test_held_message_lookup_rides_the_write_batch_and_sees_earlier_writes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each REGISTER looks for held MESSAGEs: the lookup goes in the batch of the writes in
    flight (no round trip of its own), after them, so it sees what was written before it."""
    url = f"{redis_server.url}?prefix=p{free_port()}:"
    async with await RedisStore.open(url, tmp_path) as store:
        await store.bindings.count()  # connected
        before = store._r.batches
        binding = make("sip:alice@10.0.0.1", at=T0, tokens=("T1",))
        message = HeldMessage(AOR, b"MESSAGE", T0, T0 + 60)
        _, mid, held = await asyncio.gather(
            store.bindings.upsert(binding), store.messages.add(message), store.messages.pending(AOR)
        )
        assert [m.id for m in held] == [mid]
        assert store._r.batches - before == 1


async def test_register_with_bytes_that_are_not_utf8_then_a_failing_store_on_redis(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The registrar on Redis: a REGISTER whose To user (``%E9``) and Call-ID carry a
    Latin-1 byte is stored (200) and its retransmission with the same CSeq refused as
    stale; a store that fails (Redis out of memory) is a 500 with a reason phrase and
    Retry-After, not a hang; the same store answers 200 once Redis has room again."""
    from sipwake.clock import FakeClock
    from sipwake.proxy.registrar import Registrar
    from sipwake.sip.message import Request, parse_message
    from tests.proxy.test_registrar import SOURCE, make_config, register

    def latin1(request: Request, cseq: int) -> Request:
        raw = request.to_bytes().replace(b"Call-ID: reg-1", b"Call-ID: r\xe9g-1")
        head, _, rest = raw.partition(b"CSeq: ")
        raw = head + b"CSeq: %d REGISTER" % cseq + rest[rest.index(b"\r\n") :]
        parsed = parse_message(raw)
        assert isinstance(parsed, Request)
        return parsed

    store = await RedisStore.open(own_redis.url, tmp_path)
    registrar = Registrar(make_config(), store, clock=FakeClock())
    try:
        first = latin1(register(["<sip:ren%E9@10.0.0.1:5062>"], user="ren%E9"), 7)
        r = await registrar.handle_register(first, SOURCE)
        assert r.status == 200, r.reason
        assert [b.call_id for b in await store.bindings.get("sip:ren\udce9@example.org")] == [
            "r\udce9g-1"
        ]
        r = await registrar.handle_register(first, SOURCE)
        assert (r.status, r.headers.get("retry-after")) == (500, "1")
        own_redis.cli("CONFIG", "SET", "maxmemory", "1")
        r = await registrar.handle_register(register(["<sip:alice@10.0.0.2:5062>"]), SOURCE)
        assert (r.status, r.reason) == (500, "Server Internal Error (storage)")
        assert r.headers.get("retry-after") == "5"
        own_redis.cli("CONFIG", "SET", "maxmemory", "0")
        r = await registrar.handle_register(register(["<sip:alice@10.0.0.2:5062>"]), SOURCE)
        assert r.status == 200
    finally:
        await registrar.aclose()
        await store.close()
