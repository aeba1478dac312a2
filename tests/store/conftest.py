"""Backends of the store contract suite.

Every contract test takes the ``backend`` fixture, which is parametrized by backend name;
adding Redis means adding a class with the same three methods and its name to BACKENDS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import pytest

from sipwake.clock import FakeClock
from sipwake.store import Store
from sipwake.store.sqlite import SqliteStore


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


BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": SqliteBackend}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    await b.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
