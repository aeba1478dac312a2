"""Fixtures for the simulator tests: a running APNs simulator and HTTP/2 clients."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.simulator.apns import ApnsSimulator

from .h2client import H2Client


@pytest.fixture
def clock() -> FakeClock:
    """Wall time starts at the real time: provider tokens are checked against it."""
    return FakeClock(wall_start=time.time())


@pytest.fixture
async def sim(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ApnsSimulator]:
    simulator = ApnsSimulator(tmp_path / "state", clock=clock)
    await simulator.start()
    yield simulator
    await simulator.stop()


Connect = Callable[..., Awaitable[H2Client]]


@pytest.fixture
async def connect(sim: ApnsSimulator) -> AsyncIterator[Connect]:
    """Open HTTP/2 connections to the simulator; all are closed after the test."""
    clients: list[H2Client] = []

    async def open_(env: str = "prod", cert: Path | None = None) -> H2Client:
        ctx = sim.pki.client_context(cert)
        client = await H2Client.connect(sim.url(env), ctx)
        clients.append(client)
        return client

    yield open_
    for c in clients:
        await c.close()
