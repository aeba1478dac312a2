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

from sipwake.store import HeldMessage
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
