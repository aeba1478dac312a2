"""Fixtures shared by the router tests: a fresh SQLite store and the router harness on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.store import Store, open_url

from .router_helpers import Harness, make_harness


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_url("", tmp_path)
    yield s
    await s.close()


@pytest.fixture
async def h(store: Store) -> AsyncIterator[Harness]:
    harness = make_harness(store)
    yield harness
    await harness.router.aclose()
