"""What is particular to the SQLite backend: files, durability, migrations, threading."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sipwake.config import ConfigError, parse_config
from sipwake.store import HeldMessage, StoreError, open_store, parse_url
from sipwake.store.crypto import SecretBox
from sipwake.store.model import Credential
from sipwake.store.sqlite import MIGRATIONS, SqliteStore, migrate

HERE = Path(__file__).parent


def msg(n: int) -> HeldMessage:
    return HeldMessage("sip:bob@example.com", b"MESSAGE %d" % n, 0.0, 1e12)


def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db, data = tmp_path / "data" / "s.db", tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "store_writer_proc.py"), str(db), str(data)],
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

    async def check() -> None:
        async with await SqliteStore.open(db, data) as store:
            held = {m.id: m for m in await store.messages.pending("sip:bob@example.com")}
            assert messages <= held.keys()
            for mid in messages:
                assert held[mid].request == f"MESSAGE {mid[1:]}".encode()
            for aor in aors:
                assert len(await store.bindings.get(aor)) == 1

    asyncio.run(check())


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        before = store.commits
        await asyncio.gather(*(store.messages.add(msg(n)) for n in range(200)))
        assert store.commits - before < 200
        assert await store.messages.count() == 200


async def test_event_loop_runs_while_the_writer_waits_on_disk(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        started, release = threading.Event(), threading.Event()

        def slow(conn: sqlite3.Connection) -> str:
            started.set()
            release.wait(10)  # stands for a slow fsync; the test releases it
            return "done"

        writer = store._writer
        pending = asyncio.ensure_future(writer.call(slow, on_thread=True))
        # The loop keeps serving while the writer thread is stuck in the operation.
        assert await asyncio.to_thread(started.wait, 10)
        for _ in range(50):
            await asyncio.sleep(0)
        assert not pending.done()
        release.set()
        assert await pending == "done"


async def test_a_write_cancelled_before_it_ran_is_not_made(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        started, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        blocker = asyncio.ensure_future(store._writer.call(hold, on_thread=True))
        assert await asyncio.to_thread(started.wait, 10)
        add = asyncio.ensure_future(store.messages.add(msg(1)))
        await asyncio.sleep(0)
        add.cancel()
        release.set()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await add
        assert await store.messages.count() == 0


async def test_reads_do_not_wait_behind_a_busy_writer(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        mid = await store.messages.add(msg(1))
        started, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        blocker = asyncio.ensure_future(store._writer.call(hold, on_thread=True))
        assert await asyncio.to_thread(started.wait, 10)
        try:
            assert [m.id for m in await store.messages.pending("sip:bob@example.com")] == [mid]
            assert not blocker.done()
        finally:
            release.set()
        await blocker


async def test_failed_operation_does_not_undo_others_in_its_batch(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        dup = HeldMessage("sip:bob@example.com", b"x", 0.0, 1e12, id="same")
        results = await asyncio.gather(
            store.messages.add(msg(1)),
            store.messages.add(dup),
            store.messages.add(dup),
            store.messages.add(msg(2)),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["str", "str", "StoreConflict", "str"]
        assert await store.messages.count() == 3


async def test_full_disk_fails_the_write_precisely_and_keeps_the_rest(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        kept = await store.messages.add(msg(1))
        pages = await store._writer.call(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await store._writer.call(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
        big = HeldMessage("sip:bob@example.com", b"x" * 200_000, 0.0, 1e12)
        with pytest.raises(StoreError, match="full"):
            await store.messages.add(big)
        assert [m.id for m in await store.messages.pending("sip:bob@example.com")] == [kept]
        assert await store.messages.delete(kept) is True  # the store still works


async def test_migrates_an_empty_file_and_reopens_without_migrating(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"")
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.messages.add(msg(1))
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"bindings", "messages", "credentials", "apps", "rejected_tokens"} <= tables
    finally:
        conn.close()
    async with await SqliteStore.open(db, tmp_path) as store:
        assert await store.messages.count() == 1


async def test_database_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "d" / "s.db"
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.messages.add(msg(1))
        for f in (db, db.with_name("s.db-wal")):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_later_migrations_apply_once_and_a_failed_one_changes_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        v1 = "CREATE TABLE t (a INTEGER)"
        v2 = "ALTER TABLE t ADD COLUMN b TEXT; CREATE INDEX t_b ON t (b)"
        assert migrate(conn, [v1]) == 0
        conn.execute("INSERT INTO t (a) VALUES (1)")
        assert migrate(conn, [v1, v2]) == 1
        assert migrate(conn, [v1, v2]) == 2
        assert conn.execute("SELECT a, b FROM t").fetchall() == [(1, None)]
        broken = "CREATE TABLE u (x); CREATE TABLE u (x)"
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, [v1, v2, broken])
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'u'").fetchall() == []
    finally:
        conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match=r"schema version \d+ is newer"):
        await SqliteStore.open(db, tmp_path)


async def test_not_a_database_is_a_precise_error(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"this is a text file, not a database" * 100)
    with pytest.raises(StoreError, match=r"s\.db: not a usable sipwake database"):
        await SqliteStore.open(db, tmp_path)


async def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "s.db", tmp_path)
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.messages.count()


def test_urls_resolve_under_the_data_dir(tmp_path: Path) -> None:
    assert parse_url("", tmp_path).path == tmp_path / "sipwake.db"
    assert parse_url("sqlite:///x/s.db", tmp_path).path == tmp_path / "x" / "s.db"
    assert parse_url("sqlite:////var/lib/s.db", tmp_path).path == Path("/var/lib/s.db")
    assert parse_url("redis://127.0.0.1:6379/0", tmp_path).backend == "redis"
    for bad in ("mysql://h/db", "sqlite://s.db", "sqlite:///", "s.db"):
        with pytest.raises(ConfigError, match=r"\[storage\] url"):
            parse_url(bad, tmp_path)


async def test_open_store_uses_config_data_dir_and_makes_a_private_key(tmp_path: Path) -> None:
    config = parse_config({"server": {"data-dir": str(tmp_path / "d")}})
    store = await open_store(config)
    try:
        cred = await store.credentials.add(Credential(alias="a", type="ios", secret=b"pem"))
    finally:
        await store.close()
    assert (tmp_path / "d" / "sipwake.db").exists()
    key = tmp_path / "d" / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    store = await open_store(config)
    try:
        assert await store.credentials.get_secret(cred.id) == b"pem"
    finally:
        await store.close()


async def test_another_key_file_cannot_read_secrets(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with await SqliteStore.open(db, tmp_path / "k1") as store:
        cred = await store.credentials.add(Credential(alias="a", type="ios", secret=b"pem"))
    async with await SqliteStore.open(db, tmp_path / "k2") as store:
        with pytest.raises(StoreError, match="cannot decrypt"):
            await store.credentials.get_secret(cred.id)


def test_sealed_secret_is_bound_to_its_record(tmp_path: Path) -> None:
    box = SecretBox.from_data_dir(tmp_path)
    sealed = box.encrypt("credential:a", b"secret")
    assert b"secret" not in sealed
    assert box.decrypt("credential:a", sealed) == b"secret"
    with pytest.raises(StoreError, match="cannot decrypt"):
        box.decrypt("credential:b", sealed)
    with pytest.raises(StoreError, match="unknown format"):
        box.decrypt("credential:a", b"\x02" + sealed[1:])


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    SecretBox.from_data_dir(tmp_path)
    key = tmp_path / "secret.key"
    key.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        SecretBox.from_data_dir(tmp_path)
    key.chmod(0o600)
    key.write_bytes(b"short")
    with pytest.raises(StoreError, match="must hold 32 bytes"):
        SecretBox.from_data_dir(tmp_path)


async def test_close_completes_the_writes_queued_before_it(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "s.db", tmp_path)
    adds = [asyncio.ensure_future(store.messages.add(msg(n))) for n in range(50)]
    await asyncio.sleep(0)  # one turn of the loop: each add has queued its write
    await store.close()
    assert all(a.done() and a.exception() is None for a in adds)
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as again:
        assert await again.messages.count() == 50


async def test_the_store_refuses_an_event_loop_other_than_its_own(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:

        def elsewhere() -> str:
            return asyncio.run(store.messages.add(msg(1)))

        with pytest.raises(StoreError, match="event loop other than its own"):
            await asyncio.to_thread(elsewhere)
        assert await store.messages.add(msg(2))
        assert await store.messages.count() == 1


async def test_a_batch_on_the_loop_writes_nothing_to_the_wal(tmp_path: Path) -> None:
    """The statements run on the event loop, the WAL writes (and the fsync of its header
    after a reset) only in COMMIT on the writer's thread: no cache spill mid-batch. A small
    page cache stands for a big database."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        await store._writer.call(lambda c: c.execute("PRAGMA cache_size=16"))
        wal = tmp_path / "s.db-wal"
        seen: list[bytes] = []

        def read_wal(conn: sqlite3.Connection) -> None:
            seen.append(wal.read_bytes())

        async def look() -> None:  # a coroutine: queued in its turn, like the adds
            await store._writer.call(read_wal)

        before = store.commits
        big = [HeldMessage("sip:bob@example.com", b"x" * 2000, 0.0, 1e12) for _ in range(100)]
        # Queued in this order before the batch starts: one batch, the looks at its ends.
        await asyncio.gather(look(), *(store.messages.add(m) for m in big), look())
        assert store.commits == before + 1
        assert seen[0] == seen[1], "the batch wrote to the WAL on the event loop"
        assert await store.messages.count() == 100


async def test_every_close_waits_for_the_closing_and_a_cancelled_one_does_not_stop_it(
    tmp_path: Path,
) -> None:
    store = await SqliteStore.open(tmp_path / "s.db", tmp_path)
    adds = [asyncio.ensure_future(store.messages.add(msg(n))) for n in range(50)]
    await asyncio.sleep(0)  # one turn of the loop: each add has queued its write
    cancelled = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    cancelled.cancel()
    await store.close()  # returns once the closing is done, not at once
    assert all(a.done() and a.exception() is None for a in adds)
    conn = store._writer._conn
    assert conn is not None
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        conn.execute("SELECT 1")
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as again:  # unlocked
        assert await again.messages.count() == 50


async def test_an_error_a_future_refuses_is_answered_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:

        def stops(conn: sqlite3.Connection) -> None:
            raise StopIteration  # a future refuses it (set_exception raises TypeError)

        with pytest.raises(StoreError, match="StopIteration"):
            await store._writer.call(stops)
        assert await store.messages.add(msg(1))


async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_event_loop(
    tmp_path: Path,
) -> None:
    """An operator's sqlite3 shell in a write transaction: the loop goes on serving (the
    reads), the write waits for the lock on the writer's thread and is made once the
    shell's transaction ends."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        first = await store.messages.add(msg(1))
        shell = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
        try:
            shell.execute("BEGIN IMMEDIATE")
            add = asyncio.ensure_future(store.messages.add(msg(2)))
            # Before, the BEGIN on the loop would have held it for busy_timeout (5 s),
            # then failed: "database is locked".
            assert [m.id for m in await store.messages.pending("sip:bob@example.com")] == [first]
            assert not add.done()
            shell.execute("ROLLBACK")
            assert await add
        finally:
            shell.close()
        assert await store.messages.count() == 2
