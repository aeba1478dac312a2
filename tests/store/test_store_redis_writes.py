"""Failures in the Redis store's write batches: the failing write gets its own error, the
other writes of its batch their results, and the store keeps working afterwards.

Writes queue for one background flusher that sends them as MULTI/EXEC pipelines; a failure
it does not expect must neither leave a caller waiting for ever nor stop the flusher (every
later write would wait too). A hang here ends with pytest-timeout's failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sipwake.store import HeldMessage, StoreError, UpsertResult
from sipwake.store.redis import RedisStore
from tests.conftest import free_port
from tests.store.redis_server import RedisServer
from tests.store.test_store_bindings import make

AOR = "sip:alice@example.com"
T0 = 1_767_225_600.0


@pytest.fixture
async def store(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[RedisStore]:
    url = f"{redis_server.url}?prefix=w{free_port()}:"
    async with await RedisStore.open(url, tmp_path) as s:
        await s.bindings.upsert(make("sip:alice@10.0.0.9"))  # the upsert script is loaded
        yield s


async def one_batch(store: RedisStore, *writes: Any) -> list[Any]:
    """Run ``writes`` concurrently; they were queued together, so they went in one batch
    (the failures raised before queueing aside), which this checks."""
    before = store.batches
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert store.batches - before == 1
    return results


async def still_works(store: RedisStore) -> None:
    b = make("sip:alice@10.0.0.7", at=T0 + 7)
    assert (await store.bindings.upsert(b)).bindings is not None
    assert b in await store.bindings.get(AOR)
    mid = await store.messages.add(HeldMessage(AOR, b"MESSAGE after", T0, T0 + 60))
    assert await store.messages.delete(mid) is True


async def test_a_write_that_cannot_be_encoded_fails_alone(store: RedisStore) -> None:
    """A lone surrogate that no bytes on the wire give (not ``\\udc80``-``\\udcff``), in
    a binding or in a held MESSAGE's target: that call raises ValueError, queueing
    nothing; the writes queued with it are done."""
    good = make("sip:alice@10.0.0.1", at=T0 + 1)
    bad = make("sip:alice@10.0.0.2", at=T0 + 2)
    bad.call_id = "reg-\ud800"
    message = HeldMessage(AOR, b"MESSAGE", T0, T0 + 60)
    unsendable = HeldMessage(AOR, b"MESSAGE", T0, T0 + 60, target="sip:\ud800@10.0.0.1")
    up, failed, mid, not_held, held = await one_batch(
        store,
        store.bindings.upsert(good),
        store.bindings.upsert(bad),
        store.messages.add(message),
        store.messages.add(unsendable),
        store.messages.pending(AOR),
    )
    for error in (failed, not_held):
        assert isinstance(error, ValueError) and "'\\ud800'" in str(error)
    assert isinstance(mid, str) and [m.id for m in held] == [mid]
    assert good in up.bindings and bad not in await store.bindings.get(AOR)
    await still_works(store)


async def test_a_write_of_the_wrong_type_fails_alone(store: RedisStore) -> None:
    """A value that is neither text nor bytes (a caller without type checks): ValueError
    for that write, not a Redis error for the whole batch."""
    good = make("sip:alice@10.0.0.1", at=T0 + 1)
    bad = make("sip:alice@10.0.0.2", at=T0 + 2)
    bad.call_id = None  # type: ignore[assignment]
    message = HeldMessage(AOR, b"MESSAGE", T0, T0 + 60, target=3)  # type: ignore[arg-type]
    up, failed, not_held = await one_batch(
        store,
        store.bindings.upsert(good),
        store.bindings.upsert(bad),
        store.messages.add(message),
    )
    assert isinstance(failed, ValueError) and "NoneType" in str(failed)
    assert isinstance(not_held, ValueError) and "int" in str(not_held)
    assert good in up.bindings
    await still_works(store)


async def test_a_lua_error_fails_only_its_own_write(store: RedisStore) -> None:
    """Errors raised by a script (an error reply, a runtime error, a script that does not
    compile, loaded only once Redis said NOSCRIPT) reach that write's caller alone."""
    good = make("sip:alice@10.0.0.1", at=T0 + 1)
    r = store._r
    up, replied, raised, broken, mid = await one_batch(
        store,
        store.bindings.upsert(good),
        r.write("return redis.error_reply('ERR refused by the script')", []),
        r.write("return redis.call('INCR', ARGV[1] .. 'msg') .. nil", ["x"]),
        r.write("this is not Lua", []),
        store.messages.add(HeldMessage(AOR, b"MESSAGE", T0, T0 + 60)),
    )
    assert good in up.bindings and isinstance(mid, str)
    assert isinstance(replied, StoreError) and "refused by the script" in str(replied)
    assert isinstance(raised, StoreError) and "concatenate" in str(raised)
    assert isinstance(broken, StoreError) and "Error compiling script" in str(broken)
    assert [m.id for m in await store.messages.pending(AOR)] == [mid]
    await still_works(store)


async def test_script_cache_flushed_then_a_failing_write_in_the_batch(
    redis_server: RedisServer, store: RedisStore
) -> None:
    """Redis forgot every script (as after a restart): the batch is run again after the
    scripts are loaded, and a failure of one write there stays its own."""
    redis_server.cli("SCRIPT", "FLUSH")
    good = make("sip:alice@10.0.0.1", at=T0 + 1)
    up, replied = await one_batch(
        store,
        store.bindings.upsert(good),
        store._r.write("return redis.error_reply('ERR no')", []),
    )
    assert good in up.bindings
    assert isinstance(replied, StoreError) and "no" in str(replied)
    await still_works(store)


async def paused_batch(server: RedisServer, tmp_path: Path) -> tuple[RedisStore, list[Any]]:
    """A store whose write batch is on the wire and held there: Redis runs no write until
    ``CLIENT UNPAUSE`` (reads go on). A long socket timeout keeps it held."""
    store = await RedisStore.open(f"{server.url}?socket_timeout=60", tmp_path)
    server.cli("CLIENT", "PAUSE", "600000", "WRITE")
    writes = [
        asyncio.ensure_future(store.bindings.upsert(make(f"sip:alice@10.0.0.{i}", at=T0 + i)))
        for i in range(3)
    ]
    # A read answered: the writes queued and their flusher sent them (or is sending them),
    # before this task went on; the paused Redis does not answer it.
    assert await store.bindings.count() == 0
    assert not any(w.done() for w in writes)
    return store, writes


async def test_a_close_cancelled_does_not_abandon_the_writes_on_the_wire(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """close() waits for the batch in flight; a shutdown that gives up on it (cancels the
    close) must not cancel the batch, whose callers would then wait for ever."""
    store, writes = await paused_batch(own_redis, tmp_path)
    closing = asyncio.ensure_future(store.close())
    await store.bindings.count()  # the close is waiting for the batch by now
    assert not closing.done()
    closing.cancel()
    own_redis.cli("CLIENT", "UNPAUSE")
    results = await asyncio.gather(*writes)
    assert all(r.previous is None for r in results)
    assert len(await store.bindings.get(AOR)) == 3
    await store.close()


async def test_a_cancelled_flusher_answers_its_callers(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The flusher cancelled (the event loop shutting down) with a batch on the wire: its
    callers get a StoreError saying the outcome is unknown; a later write starts again."""
    store, writes = await paused_batch(own_redis, tmp_path)
    flusher = store._r._flusher
    assert flusher is not None
    flusher.cancel()
    own_redis.cli("CLIENT", "UNPAUSE")
    results = await asyncio.gather(*writes, return_exceptions=True)
    # (redis-py may swallow a cancellation that comes as a reply is being read: then the
    # batch completes; either way each caller is answered.)
    for r in results:
        assert isinstance(r, UpsertResult) or (
            isinstance(r, StoreError) and "interrupted" in str(r)
        ), r
    b = make("sip:bob@10.0.0.1", aor="sip:bob@example.com")
    await store.bindings.upsert(b)
    assert await store.bindings.get(b.aor) == [b]
    await store.close()


async def test_a_caller_cancelled_while_its_batch_is_on_the_wire(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The caller gives up (its SIP transaction ended): the other callers of the batch get
    their results, and the store goes on."""
    store, writes = await paused_batch(own_redis, tmp_path)
    writes[1].cancel()
    own_redis.cli("CLIENT", "UNPAUSE")
    first, _, last = await asyncio.gather(*writes, return_exceptions=True)
    assert writes[1].cancelled()
    assert isinstance(first, UpsertResult) and isinstance(last, UpsertResult)
    await store.bindings.upsert(make("sip:alice@10.0.0.9", at=T0 + 9))
    # Whether the cancelled write was applied is not known to anyone: no assertion on it.
    contacts = {b.contact for b in await store.bindings.get(AOR)}
    assert contacts >= {"sip:alice@10.0.0.0", "sip:alice@10.0.0.2", "sip:alice@10.0.0.9"}
    await store.close()
