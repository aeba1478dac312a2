"""Backends of the store contract suite.

Every contract test takes the ``backend`` fixture, which is parametrized by backend name;
each backend is a class with the same methods, named in BACKENDS. The Redis backend runs
on a real redis-server that the session starts (tests/store/redis_server.py).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from sipwake.clock import FakeClock
from sipwake.store import Store
from sipwake.store.redis import RedisStore
from sipwake.store.sqlite import SqliteStore
from tests.store.redis_server import RedisServer


class Backend(Protocol):
    clock: FakeClock

    async def open(self) -> Store:
        """A store on this backend's data; the same data every time (reopen = restart)."""
        ...

    def stored_bytes(self) -> bytes:
        """Everything the backend keeps at rest, to look for secrets in clear."""
        ...

    async def reopen(self, store: Store) -> Store:
        """Close ``store`` and open the same data again, as a restart of sipwake would."""
        ...

    async def close(self) -> None: ...


class SqliteBackend:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.data_dir = tmp_path / "data"
        self.path = self.data_dir / "sipwake.db"
        self._open: list[SqliteStore] = []

    async def open(self) -> Store:
        store = await SqliteStore.open(self.path, self.data_dir, now=self.clock.wall)
        self._open.append(store)
        return store

    def stored_bytes(self) -> bytes:
        return b"".join(
            p.read_bytes()
            for p in sorted(self.data_dir.iterdir())
            if p.name.startswith(self.path.name)
        )

    async def reopen(self, store: Store) -> Store:
        await store.close()
        return await self.open()

    async def close(self) -> None:
        for store in self._open:
            await store.close()


class RedisBackend:
    """The contract suite on the session's redis-server; each test has its own key prefix."""

    server: RedisServer  # set by the backend fixture
    _prefixes = itertools.count()

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.data_dir = tmp_path / "data"
        self.prefix = f"t{next(self._prefixes)}:"
        self._open: list[RedisStore] = []

    async def open(self) -> Store:
        url = f"{self.server.url}?prefix={self.prefix}"
        store = await RedisStore.open(url, self.data_dir, now=self.clock.wall)
        self._open.append(store)
        return store

    def stored_bytes(self) -> bytes:
        return self.server.stored_bytes()

    async def reopen(self, store: Store) -> Store:
        await store.close()
        return await self.open()

    async def close(self) -> None:
        for store in self._open:
            await store.close()


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": SqliteBackend, "redis": RedisBackend}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session's contract tests (started here, stopped by PID)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "redis":
        RedisBackend.server = request.getfixturevalue("redis_server")
    b = BACKENDS[request.param](tmp_path)
    yield b
    await b.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
