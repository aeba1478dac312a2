"""Persistence behind small interfaces: bindings, held messages, apps and credentials,
rejected tokens. SQLite is the embedded default; a Redis backend serves a cluster.

Callers use :func:`open_store` (or :func:`open_url`) and the protocols in
:mod:`sipwake.store.base`; they never see SQL or Redis commands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sipwake.config import Config, ConfigError
from sipwake.store.base import (
    AppStore,
    BindingStore,
    CredentialStore,
    MessageStore,
    NotFound,
    RejectedTokenStore,
    StaleBinding,
    Store,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from sipwake.store.model import (
    App,
    Binding,
    Credential,
    HeldMessage,
    Page,
    Received,
    RejectedToken,
    UpsertResult,
    push_key_for,
)

__all__ = [
    "App",
    "AppStore",
    "Binding",
    "BindingStore",
    "Credential",
    "CredentialStore",
    "HeldMessage",
    "MessageStore",
    "NotFound",
    "Page",
    "Received",
    "RejectedToken",
    "RejectedTokenStore",
    "StaleBinding",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "StoreUrl",
    "UpsertResult",
    "open_store",
    "open_url",
    "parse_url",
    "push_key_for",
]

DEFAULT_SQLITE_FILE = "sipwake.db"


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed ``[storage] url``: the backend and where its data lives."""

    backend: str  # "sqlite" or "redis"
    path: Path | None = None  # SQLite database file
    url: str = ""


def parse_url(url: str, data_dir: Path) -> StoreUrl:
    """Read ``[storage] url``; relative SQLite paths are under ``data_dir``.

    ``sqlite:///relative.db`` (three slashes) is relative to the data dir and
    ``sqlite:////absolute/path.db`` (four) is absolute, as in SQLAlchemy URLs.
    """
    if not url:
        return StoreUrl("sqlite", data_dir / DEFAULT_SQLITE_FILE)
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        if not rest or rest.endswith("/") or "?" in rest:
            raise ConfigError(f"[storage] url: expected sqlite:///file.db, got {url!r}")
        path = Path(rest)
        return StoreUrl("sqlite", path if path.is_absolute() else data_dir / path)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from sipwake.store.redis import parse_redis_url

        try:
            parse_redis_url(url)
        except ValueError as exc:
            raise ConfigError(f"[storage] url: {exc}") from None
        return StoreUrl("redis", url=url)
    raise ConfigError(
        "[storage] url: expected sqlite:///relative.db, sqlite:////absolute.db, "
        f"redis://host:port/db or redis+sentinel://host:port/service, got {url!r}"
    )


async def open_url(url: str, data_dir: Path, now: Callable[[], float] | None = None) -> Store:
    """Open the store named by ``url``; secrets are sealed with the key in ``data_dir``."""
    target = parse_url(url, data_dir)
    if target.backend == "redis":
        from sipwake.store.redis import RedisStore

        if now is None:
            return await RedisStore.open(target.url, data_dir)
        return await RedisStore.open(target.url, data_dir, now=now)
    from sipwake.store.sqlite import SqliteStore

    assert target.path is not None
    if now is None:
        return await SqliteStore.open(target.path, data_dir)
    return await SqliteStore.open(target.path, data_dir, now=now)


async def open_store(config: Config, now: Callable[[], float] | None = None) -> Store:
    """The store configured by ``[storage] url`` under ``[server] data-dir``."""
    return await open_url(config.storage.url, config.data_dir, now)
