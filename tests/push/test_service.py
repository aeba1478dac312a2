"""PushService queueing: a concurrency cap per provider instance, then a bounded wait."""

from __future__ import annotations

import asyncio

from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest, PushResult
from sipwake.push.service import PushService


class Gate:
    """A provider whose pushes end when the test opens the gate; counts concurrency."""

    def __init__(self, name: str = "apns") -> None:
        self.name = name
        self.open = asyncio.Event()
        self.active = 0
        self.peak = 0
        self.started = 0
        self.order: list[str] = []

    def accepts(self, destination: Destination) -> bool:
        return True

    async def send(self, request: PushRequest) -> PushResult:
        self.active += 1
        self.started += 1
        self.peak = max(self.peak, self.active)
        self.order.append(request.destination.token)
        try:
            await self.open.wait()
        finally:
            self.active -= 1
        return PushResult(Outcome.SENT)

    async def aclose(self) -> None:
        pass


def req(token: str) -> PushRequest:
    return PushRequest(Destination(Provider.APNS, "org.example.app", token), PushKind.MESSAGE)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_pushes_beyond_the_concurrency_cap_wait_instead_of_failing() -> None:
    gate = Gate()
    service = PushService([gate], max_queue_size=100, max_concurrent=10)
    tasks = [asyncio.ensure_future(service.send(req(f"{i:04x}"))) for i in range(110)]
    await settle()
    assert gate.started == 10  # the rest wait for a turn
    assert service.queue_depth() == {"apns": 110}  # waiting + under way
    gate.open.set()
    results = await asyncio.gather(*tasks)
    assert [r.outcome for r in results] == [Outcome.SENT] * 110
    assert gate.peak == 10
    assert gate.order == [f"{i:04x}" for i in range(110)]  # first come, first served
    assert service.queue_depth() == {}


async def test_only_pushes_beyond_max_queue_size_waiting_fail_with_a_clear_reason() -> None:
    gate = Gate()
    service = PushService([gate], max_queue_size=5, max_concurrent=2)
    tasks = [asyncio.ensure_future(service.send(req(f"{i:04x}"))) for i in range(8)]
    await settle()
    done = [t.result() for t in tasks if t.done()]
    assert len(done) == 1 and done[0].outcome is Outcome.FAILED
    assert done[0].reason == (
        "apns queue full: 2 pushes under way and 5 waiting (max-queue-size 5)"
    )
    gate.open.set()
    results = await asyncio.gather(*tasks)
    assert sum(r.ok for r in results) == 7


async def test_default_service_sends_hundreds_to_one_provider_at_once() -> None:
    # The defaults must not fail a 1000-item batch (/pnm2/multisend, /v1/push).
    gate = Gate()
    service = PushService([gate])
    tasks = [asyncio.ensure_future(service.send(req(f"{i:04x}"))) for i in range(1000)]
    await settle()
    assert not any(t.done() for t in tasks)
    gate.open.set()
    assert all(r.ok for r in await asyncio.gather(*tasks))


async def test_providers_sharing_a_name_have_their_own_budget() -> None:
    first, second = Gate(), Gate()
    routes = {"a": first, "b": second}
    service = PushService(
        [first], max_queue_size=1, max_concurrent=1, lookup=lambda d: routes[d.app_id]
    )

    def to(app: str, token: str) -> PushRequest:
        return PushRequest(Destination(Provider.APNS, app, token), PushKind.MESSAGE)

    tasks = [asyncio.ensure_future(service.send(to(app, f"{i}"))) for app in "ab" for i in (1, 2)]
    await settle()
    assert not any(t.done() for t in tasks)  # one under way and one waiting each
    assert service.queue_depth() == {"apns": 4}
    first.open.set()
    second.open.set()
    assert all(r.ok for r in await asyncio.gather(*tasks))


async def test_a_cancelled_waiting_push_gives_up_its_place() -> None:
    gate = Gate()
    service = PushService([gate], max_queue_size=10, max_concurrent=1)
    running = asyncio.ensure_future(service.send(req("aa")))
    waiting = asyncio.ensure_future(service.send(req("bb")))
    last = asyncio.ensure_future(service.send(req("cc")))
    await settle()
    waiting.cancel()
    await settle()
    assert service.queue_depth() == {"apns": 2}
    gate.open.set()
    assert (await running).ok and (await last).ok
    assert gate.order == ["aa", "cc"]
    assert service.queue_depth() == {}
