"""Contract of MessageStore: held MESSAGEs survive restarts, in order, exactly once."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from sipwake.clock import FakeClock
from sipwake.config import parse_config
from sipwake.proxy.messages import HeldMessages
from sipwake.sip.message import Request, parse_message
from sipwake.store import HeldMessage, Store

if TYPE_CHECKING:
    from tests.store.conftest import Backend

AOR = "sip:bob@example.com"
T0 = 1_767_225_600.0


def message(n: int, aor: str = AOR, ttl: float = 604800, target: str | None = None) -> HeldMessage:
    body = f"hello {n} \u00e9".encode() + b"\xff\x00"  # raw bytes, not only UTF-8 text
    request = (
        b"MESSAGE sip:bob@example.com SIP/2.0\r\nCall-ID: m%d\r\nContent-Length: %d\r\n\r\n"
        % (n, len(body))
    ) + body
    return HeldMessage(
        aor=aor, request=request, received_at=T0 + n, expires_at=T0 + n + ttl, target=target
    )


async def test_pending_in_arrival_order_byte_exact(store: Store) -> None:
    msgs = [message(n) for n in range(5)]
    ids = [await store.messages.add(m) for m in msgs]
    assert len(set(ids)) == 5
    pending = await store.messages.pending(AOR)
    assert [p.id for p in pending] == ids
    assert [p.request for p in pending] == [m.request for m in msgs]
    assert [p.sequence for p in pending] == sorted(p.sequence for p in pending)
    assert len({p.sequence for p in pending}) == 5
    assert await store.messages.pending("sip:carol@example.com") == []
    await store.messages.add(message(9, aor="sip:carol@example.com"))
    assert await store.messages.count(AOR) == 5
    assert await store.messages.count("sip:carol@example.com") == 1
    assert await store.messages.count() == 6


async def test_target_and_times_are_kept(store: Store) -> None:
    m = message(1, target="<urn:uuid:dev>")
    mid = await store.messages.add(m)
    (got,) = await store.messages.pending(AOR)
    assert (got.id, got.aor, got.target) == (mid, AOR, "<urn:uuid:dev>")
    assert (got.received_at, got.expires_at) == (m.received_at, m.expires_at)


async def test_an_aor_and_target_that_were_not_utf8_on_the_wire_are_kept(
    backend: Backend, store: Store
) -> None:
    """``sip:ren%E9@...`` gives an AOR with a lone surrogate (the URI parser unescapes with
    surrogateescape): its MESSAGEs are held, found by that AOR, and survive a restart."""
    latin1 = b"\xe9".decode("utf-8", "surrogateescape")
    aor, target = f"sip:ren{latin1}@example.com", f"<urn:uuid:{latin1}>"
    mid = await store.messages.add(message(1, aor=aor, target=target))
    assert await store.messages.count(aor) == 1
    assert await store.messages.pending("sip:ren\u00e9@example.com") == []  # not the same
    store = await backend.reopen(store)
    (got,) = await store.messages.pending(aor)
    assert (got.id, got.aor, got.target) == (mid, aor, target)


async def test_concurrent_adds_all_kept_in_call_order(store: Store) -> None:
    msgs = [message(n) for n in range(100)]
    ids = await asyncio.gather(*(store.messages.add(m) for m in msgs))
    pending = await store.messages.pending(AOR)
    assert [p.id for p in pending] == list(ids)
    assert await store.messages.count() == 100


async def test_restart_delivers_in_order_exactly_once(backend: Backend, store: Store) -> None:
    ids = [await store.messages.add(message(n)) for n in range(3)]
    store = await backend.reopen(store)
    pending = await store.messages.pending(AOR)
    assert [p.id for p in pending] == ids
    # The first is delivered; a restart must neither resend it nor lose the others.
    assert await store.messages.delete(ids[0]) is True
    assert await store.messages.delete(ids[0]) is False
    store = await backend.reopen(store)
    assert [p.id for p in await store.messages.pending(AOR)] == ids[1:]
    assert await store.messages.delete(ids[0]) is False
    # Later arrivals still come after the ones held before the restart.
    later = await store.messages.add(message(9))
    assert [p.id for p in await store.messages.pending(AOR)] == [*ids[1:], later]


async def test_concurrent_deletes_deliver_once(store: Store) -> None:
    mid = await store.messages.add(message(1))
    results = await asyncio.gather(*(store.messages.delete(mid) for _ in range(5)))
    assert sorted(results) == [False, False, False, False, True]


async def test_expiry_after_delivery_timeout(backend: Backend, store: Store) -> None:
    short = message(0, ttl=60)
    long = message(1, ttl=600)
    sid = await store.messages.add(short)
    lid = await store.messages.add(long)
    assert [p.id for p in await store.messages.pending(AOR, now=T0 + 60)] == [lid]
    assert await store.messages.expire(T0 + 59) == []
    expired = await store.messages.expire(T0 + 60)
    assert [e.id for e in expired] == [sid]
    assert expired[0].request == short.request
    store = await backend.reopen(store)
    assert [p.id for p in await store.messages.pending(AOR)] == [lid]


async def test_empty_request_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="request"):
        await store.messages.add(HeldMessage(AOR, b"", T0, T0 + 1))
    assert await store.messages.count() == 0


async def test_per_device_delivery_once_per_device_across_restart_and_expiry(
    backend: Backend, store: Store
) -> None:
    """The router's per-device bookkeeping (sipwake.proxy.messages) on each backend: a
    MESSAGE owed to two devices goes to each once, across a restart; its records expire
    together."""
    clock = FakeClock(wall_start=T0)
    config = parse_config({"router": {"message-delivery-timeout": 600}})
    sent: list[bytes] = []

    async def send(request: Request) -> int:
        sent.append(request.body)
        return 200

    request = parse_message(message(1).request)
    assert isinstance(request, Request)
    held = HeldMessages(config, store, clock)
    await held.hold(AOR, request, ["phone", "tablet"])
    assert await held.deliver(AOR, "phone", send) == 1
    store = await backend.reopen(store)
    held = HeldMessages(config, store, clock)
    assert await held.deliver(AOR, "phone", send) == 0  # once per device
    assert await held.deliver(AOR, "tablet", send) == 1
    assert len(sent) == 2 and await store.messages.count() == 0

    await held.hold(AOR, request, ["phone", "tablet"])
    assert await held.deliver(AOR, "phone", send) == 1
    assert await store.messages.count() == 2  # the MESSAGE and the phone's record
    clock.advance(600)
    (gone,) = await held.expire_due()
    assert gone.request == request.to_bytes()
    assert await store.messages.count() == 0
