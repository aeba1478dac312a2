"""The default store: one SQLite file in WAL mode, written in batches with group commit.

Every write is a function of the connection, queued to the writer. The writer runs the
queued operations on the event loop's thread in one transaction, hands the COMMIT (the
fsync) to a thread of its own, and only after it completes the callers' futures; what was
queued meanwhile is the next batch. (Statements on the loop, waits on the thread: a thread
running the statements would take the GIL back from the loop at every SQLite call, at the
cost of futex wake-ups and context switches, see :class:`_Writer`.) One failing operation
does not undo the others: one that fails before it changed a row just gets its error; one
that fails after makes the writer roll back and run the batch again with each operation
inside its own savepoint (rare, so the common batch pays no savepoints). Disk waits
therefore never block the loop, and N concurrent writers cost one commit instead of N.
Reads go to a thread with a second connection, so a lookup for an INVITE never waits
behind the fsync of a batch of REGISTERs; a read queued after a write was acknowledged
starts its transaction after that COMMIT, so it sees the write.

Durability: "acknowledged only once durable" must survive a power cut or an OS crash, not
only a killed process. In WAL mode ``synchronous=NORMAL`` syncs the WAL only at
checkpoints, so a commit survives ``kill -9`` (the bytes are in the OS cache) but not a
power cut. The default is therefore ``synchronous=FULL`` (the WAL is synced at every
commit); group commit makes that one fsync per batch, not one per write.

Bindings: the writer keeps an index of every binding's key, device, times, tokens
and Call-ID/CSeq (:class:`_Index`, loaded from the table when the store opens; one process
writes the database, which a lock file enforces), so an upsert decides the registrar's
rules (refresh, stale CSeq, token held by another device, max-push-devices, expiry sweep)
without reading SQL and writes only the resulting DELETEs and the INSERT. The index is
changed only after an operation's statements succeeded, and reloaded after a rolled-back
transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson

from sipwake.push.request import token_prefix
from sipwake.store.base import NotFound, StaleBinding, StoreConflict, StoreError
from sipwake.store.crypto import SecretBox
from sipwake.store.model import (
    App,
    Binding,
    Credential,
    HeldMessage,
    Page,
    RejectedToken,
    UpsertResult,
    check_app,
    check_credential,
    check_page,
    contact_uri_text,
    credential_aad,
    public_credential,
    push_key_tokens,
    token_hash,
    wire_bytes,
)

log = logging.getLogger("sipwake.store")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

# Schema migrations, applied in order; PRAGMA user_version is the number applied.
MIGRATIONS: list[str] = [
    # 1: bindings, held messages, credentials, apps, rejected tokens.
    """
    CREATE TABLE bindings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- grows with every (re-)registration
        aor TEXT NOT NULL,
        bkey TEXT NOT NULL,
        device TEXT NOT NULL,
        registered_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        push_key TEXT,
        data TEXT NOT NULL,
        UNIQUE (aor, bkey)
    );
    CREATE INDEX bindings_expires ON bindings (expires_at);
    CREATE INDEX bindings_push ON bindings (expires_at) WHERE push_key IS NOT NULL;
    CREATE TABLE binding_tokens (
        provider TEXT NOT NULL,
        token TEXT NOT NULL,
        binding INTEGER NOT NULL REFERENCES bindings (id) ON DELETE CASCADE,
        PRIMARY KEY (provider, token, binding)
    ) WITHOUT ROWID;
    CREATE INDEX binding_tokens_binding ON binding_tokens (binding);
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        aor TEXT NOT NULL,
        target TEXT,
        request BLOB NOT NULL,
        received_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX messages_aor ON messages (aor, seq);
    CREATE INDEX messages_expires ON messages (expires_at);
    CREATE TABLE credentials (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        alias TEXT NOT NULL,
        type TEXT NOT NULL,
        public TEXT NOT NULL,
        secret BLOB NOT NULL
    );
    CREATE INDEX credentials_type ON credentials (type, seq);
    CREATE INDEX credentials_alias ON credentials (alias, seq);
    CREATE TABLE apps (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        provider TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE TABLE app_ids (
        app_identifier TEXT PRIMARY KEY,
        app TEXT NOT NULL REFERENCES apps (id) ON DELETE CASCADE
    ) WITHOUT ROWID;
    CREATE INDEX app_ids_app ON app_ids (app);
    CREATE TABLE app_credentials (
        app TEXT NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
        credential TEXT NOT NULL REFERENCES credentials (id),
        PRIMARY KEY (app, credential)
    ) WITHOUT ROWID;
    CREATE INDEX app_credentials_credential ON app_credentials (credential);
    CREATE TABLE rejected_tokens (
        provider TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        token_prefix TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (provider, token_hash)
    ) WITHOUT ROWID;
    CREATE INDEX rejected_tokens_at ON rejected_tokens (at);
    """,
    # 2: fewer b-trees written per binding. The upsert rules and the removal of a rejected
    # token read the store's in-memory index (see _Index), so the token table is no longer
    # read; no query used the partial push index (the wake-up query scans the table).
    """
    DROP INDEX bindings_push;
    DROP TABLE binding_tokens;
    """,
    # 3: bindings are written in the compact form of _binding_data (fields at their default
    # left out, the Contact URI only when the Contact value does not show it); rows of the
    # full form load as before and are not rewritten. No statement: the version tells an
    # older sipwake, which needs the full form, that it cannot read this database.
    "",
]

# Operations per transaction: bounds how long a batch holds the event loop (a few ms)
# and the results one commit holds back.
MAX_BATCH = 256


def migrate(conn: sqlite3.Connection, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Bring the schema to the latest version; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > len(migrations):
        raise StoreError(
            f"database schema version {found} is newer than this sipwake knows "
            f"({len(migrations)}); upgrade sipwake or use another [storage] url"
        )
    for version in range(found, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migrations[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("store schema migrated to version %d", version + 1)
    return found


def _statements(script: str) -> list[str]:
    """Split a migration script (no semicolons inside statements) into statements."""
    return [s.strip() for s in script.split(";") if s.strip()]


class _Batches:
    """What the reader and the writer share: their connection, and running a batch of
    operations in one transaction, so N concurrent callers cost one BEGIN and one COMMIT
    (group commit) and each gets its own result or error."""

    def __init__(self, path: Path, synchronous: str, readonly: bool) -> None:
        self._path = path
        self._synchronous = synchronous
        self._readonly = readonly
        self._closed = False
        self.commits = 0  # transactions committed (for benchmarks and tests of batching)
        # After a transaction was lost (rolled back and its callers failed); not after
        # _run_fast's own ROLLBACK before a rerun: that calls on_retry.
        self.on_rollback: Callable[[], None] | None = None
        # When a write transaction begins and, in a rerun, before each operation (after
        # its SAVEPOINT); and, with the connection, after the writer rolled a batch back
        # to run it again (see _run_fast) or, in the rerun, an operation back to its
        # savepoint: what was changed since on_begin is undone.
        self.on_begin: Callable[[], None] | None = None
        self.on_retry: Callable[[sqlite3.Connection], None] | None = None

    def _connect(self, same_thread: bool = True) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=same_thread)
        except sqlite3.Error as exc:
            raise StoreError(f"{self._path}: cannot open database: {exc}") from None
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            if self._readonly:
                conn.execute("PRAGMA query_only=ON")
                return conn
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self._path}: WAL mode is not available (got {mode})")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            # A batch's dirty pages stay in memory until COMMIT, on the writer's thread: a
            # spill mid-batch would write the WAL on the event loop (and fsync its header
            # after a WAL reset). 16384 pages bound it (64 MiB at 4 KiB, one transaction).
            conn.execute("PRAGMA cache_spill=16384")
            migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{self._path}: not a usable sipwake database: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _transaction(
        self,
        conn: sqlite3.Connection,
        batch: list[_Item],
        commit: bool = True,
        begun: bool = False,
    ) -> tuple[list[_Outcome], bool]:
        """BEGIN (unless ``begun``), the batch's operations and, if ``commit``, COMMIT:
        each operation's outcome, and whether the transaction is still open (``commit``
        false), for the caller to commit. A lost transaction is rolled back; every
        operation gets its error."""
        try:
            if not begun:
                conn.execute("BEGIN" if self._readonly else "BEGIN IMMEDIATE")
            if self.on_begin is not None:
                self.on_begin()
            outcomes = self._run_fast(conn, batch)
            if outcomes is None:
                # An operation failed after it wrote: the batch was rolled back (the index
                # too), and runs again with a savepoint per operation.
                conn.execute("BEGIN" if self._readonly else "BEGIN IMMEDIATE")
                outcomes = self._run_with_savepoints(conn, batch)
            if not commit:
                return outcomes, True
            conn.execute("COMMIT")
            self.commits += 1
            return outcomes, False
        except (sqlite3.Error, _BatchLost) as exc:
            return self._lost(conn, batch, exc), False

    def _lost(
        self, conn: sqlite3.Connection, batch: list[_Item], exc: BaseException
    ) -> list[_Outcome]:
        """The transaction failed: roll it back, and fail every operation of the batch."""
        cause = exc.__cause__ if isinstance(exc, _BatchLost) else exc
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        log.error("store transaction failed: %s", cause)
        if self.on_rollback is not None:
            self.on_rollback()
        failure = StoreError(f"database write failed: {cause}")
        return [(loop, fut, None, failure) for _, loop, fut in batch]

    def _run_fast(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[_Outcome] | None:
        """Run the batch's operations without savepoints (two statements less each).

        An operation that fails before it changed a row (a stale CSeq, a rejected value, a
        statement SQLite undid by itself) needs no undoing: it gets its error. One that
        fails after it changed rows cannot be undone alone: the transaction is rolled
        back, the writer's index told (:attr:`on_retry`), and None returned so the
        caller runs the batch again with savepoints. Rows changed are counted by
        ``total_changes`` (INSERT, UPDATE, DELETE: the only writes operations make).

        ``total_changes`` counts a statement's rows only once the statement is done: a
        ``DELETE ... RETURNING`` has deleted its rows at its first step but counts none
        until its cursor was read to the end (or reset). So an operation reads every
        RETURNING cursor to the end (``fetchall``, or ``fetchone`` of a delete by id).
        (Left unfinished, it would also make the COMMIT fail: "SQL statements in
        progress", the whole batch lost.) As a guard, a failed operation's frames are
        cleared before its count is read: that resets a cursor only they held, and its
        rows count (not a cursor kept elsewhere, such as the index's: the rule stands).

        A caller cancelled after the first attempt ran its operation, before the rerun,
        is skipped by the rerun: its write, rolled back with the first attempt, is lost.
        A cancelled caller cannot know the outcome anyway (it may have been cancelled
        before its operation ran, or after the COMMIT).
        """
        outcomes: list[_Outcome] = []
        append = outcomes.append
        for op, loop, fut in batch:
            if fut.cancelled():
                continue  # the caller gave up before the operation started: skip it
            changes = conn.total_changes
            try:
                result = op(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (disk full, I/O error):
                    # every operation of the batch is undone and must fail.
                    raise _BatchLost(exc) from exc
                if conn.total_changes == changes:
                    # Drop the locals of the operation's frames: a RETURNING cursor it
                    # left unfinished is reset and counts its rows (see above).
                    traceback.clear_frames(exc.__traceback__)
                if conn.total_changes != changes:
                    conn.execute("ROLLBACK")
                    if self.on_retry is not None:
                        self.on_retry(conn)
                    return None
                append((loop, fut, None, _store_error(exc)))
            else:
                append((loop, fut, result, None))
        return outcomes

    def _run_with_savepoints(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[_Outcome]:
        """Run the batch's operations each in its own savepoint, so one failing operation
        is undone alone and the others stand: its SQL by ``ROLLBACK TO op``, what it
        changed in memory (the index) by :attr:`on_retry`, told since :attr:`on_begin`."""
        outcomes: list[_Outcome] = []
        begin = self.on_begin
        retry = self.on_retry
        for op, loop, fut in batch:
            if fut.cancelled():
                continue  # the caller gave up before the operation started: skip it
            conn.execute("SAVEPOINT op")
            if begin is not None:
                begin()
            try:
                result = op(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    raise _BatchLost(exc) from exc
                # A RETURNING cursor left unfinished (held by these frames) would stop
                # RELEASE and COMMIT ("SQL statements in progress"): reset it.
                traceback.clear_frames(exc.__traceback__)
                conn.execute("ROLLBACK TO op")
                if retry is not None:
                    retry(conn)
                outcomes.append((loop, fut, None, _store_error(exc)))
            else:
                outcomes.append((loop, fut, result, None))
            conn.execute("RELEASE op")
        return outcomes


class _Reader(_Batches):
    """A thread that owns one connection and runs queued operations in batches: the
    reader. Each batch is one read transaction; it starts after every write its callers
    saw acknowledged, so it sees them all."""

    def __init__(self, path: Path, synchronous: str) -> None:
        super().__init__(path, synchronous, readonly=True)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="sipwake-store-reader", daemon=True)

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._started)

    def call(self, op: Op) -> asyncio.Future[Any]:
        """Queue ``op``; the future (to await) holds its result once committed. A plain
        function returning the future, not a coroutine: one frame less per store call."""
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((op, loop, fut))
        return fut

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            self._closed = True
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                batch: list[_Item] = []
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                    else:
                        batch.append(item)
                if batch:
                    outcomes, _ = self._transaction(conn, batch)
                    # One wake-up of each event loop per batch, not one per operation.
                    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
                    for outcome in outcomes:
                        by_loop.setdefault(outcome[0], []).append(outcome)
                    for loop, done in by_loop.items():
                        with contextlib.suppress(RuntimeError):  # closed: nobody waits
                            loop.call_soon_threadsafe(_complete, done)
        finally:
            conn.close()
            self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        """Calls that raced with close(): tell them the store is closed, never leave them."""
        closed = StoreError("store is closed")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _, loop, fut = item
                leftover: list[_Outcome] = [(loop, fut, None, closed)]
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_complete, leftover)


class _OnThread:
    """A write operation to run on the writer's thread, not the event loop's: one that may
    wait (on a lock, on the disk) or read a lot. It runs in a transaction of its own."""

    __slots__ = ("op",)

    def __init__(self, op: Op) -> None:
        self.op = op

    def __call__(self, conn: sqlite3.Connection) -> Any:
        return self.op(conn)


class _Writer(_Batches):
    """The writer: operations run on the event loop's thread, in one transaction per batch;
    the waits run on a thread of the writer's own: COMMIT (the fsync), and operations
    queued with ``on_thread`` (they may read a lot or wait for a lock).

    Why not every operation on the thread (as before): a Python thread takes the GIL from
    the event loop at each SQLite call it returns from, and while it waits for it, every
    GIL release of the loop (uvloop drops it at each I/O callback) wakes it with a futex
    call and a context switch on both cores. Measured with SIPp (docs/benchmarks.md): the
    writer thread woke 0.9 times per REGISTER, and REGISTER/s rose by a quarter once the
    statements ran on the loop. The statements are page-cache work (microseconds each);
    the thread waits on the disk, one GIL hand-off per batch.

    While a batch commits, new operations queue; when it is done they form the next batch.
    Every caller is answered only after its batch's COMMIT. BEGIN IMMEDIATE runs on the
    loop without waiting: the lock file makes this process the database's only sipwake
    writer, but should another connection hold the write lock (an operator's sqlite3
    shell), the writer waits for it on its thread. A batch's dirty pages stay in memory
    until COMMIT (``cache_spill``), so the loop writes nothing to the WAL.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        super().__init__(path, synchronous, readonly=False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Item] = []
        self._busy = False  # a batch is scheduled, running or committing
        self._idle: asyncio.Future[None] | None = None  # close() waits on it
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="sipwake-store-writer"
        )
        # An operation to run on the thread before the next batch, or None: lets the
        # bindings index load (seconds for a million rows) off the event loop.
        self.prepare: Callable[[], Op | None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._thread, self._open)
        except BaseException:
            self._closed = True
            self._thread.shutdown(wait=False)
            raise
        self._loop = loop

    def _open(self) -> sqlite3.Connection:
        conn = self._connect(same_thread=False)
        # BEGIN on the loop must not wait: when another connection holds the write lock,
        # it fails at once and the writer waits for the lock on its thread (_begin_waiting).
        conn.execute("PRAGMA busy_timeout=0")
        return conn

    @staticmethod
    def _begin_waiting(conn: sqlite3.Connection) -> None:
        """On the thread: BEGIN IMMEDIATE, waiting up to 5 s for another connection's
        write lock (a sqlite3 shell's transaction, say), as the reader's connection does."""
        conn.execute("PRAGMA busy_timeout=5000")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    def _on_thread(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[_Outcome]:
        """On the thread: the batch's transaction, waiting for the write lock if need be."""
        try:
            self._begin_waiting(conn)
        except sqlite3.Error as exc:
            return self._lost(conn, batch, exc)
        return self._transaction(conn, batch, begun=True)[0]

    def call(self, op: Op, on_thread: bool = False) -> asyncio.Future[Any]:
        """Queue ``op``; the future (to await) holds its result once committed. A plain
        function returning the future, not a coroutine: one frame less per store call."""
        loop = self._loop
        if self._closed or loop is None:
            raise StoreError("store is closed")
        if asyncio.get_running_loop() is not loop:
            raise StoreError("the store is used from an event loop other than its own")
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((_OnThread(op) if on_thread else op, loop, fut))
        if not self._busy:
            self._busy = True
            # After the callbacks already due: operations queued by them join the batch.
            loop.call_soon(self._next)
        return fut

    def _next(self, prepare: bool = True) -> None:
        """On the loop: start the next batch (after what :attr:`prepare` asks for, unless
        ``prepare`` is false), or go idle."""
        loop, conn, pending = self._loop, self._conn, self._pending
        assert loop is not None and conn is not None
        if not pending:
            self._busy = False
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)
            return
        job_first = self.prepare() if prepare and self.prepare is not None else None
        if job_first is not None:
            job = loop.run_in_executor(self._thread, job_first, conn)
            job.add_done_callback(self._prepared)
            return
        if isinstance(pending[0][0], _OnThread):
            batch = [pending.pop(0)]
            job = loop.run_in_executor(self._thread, self._on_thread, conn, batch)
            job.add_done_callback(lambda job: self._ran_on_thread(job, batch))
            return
        size = 0
        for op, _, _ in pending:
            if size == MAX_BATCH or isinstance(op, _OnThread):
                break
            size += 1
        batch = pending[:size]
        del pending[:size]
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                self._fail(batch, exc)
                return
            # Another connection holds the write lock: wait for it on the thread.
            job = loop.run_in_executor(self._thread, self._begin_waiting, conn)
            job.add_done_callback(lambda job: self._begun(job, batch))
            return
        self._run_batch(batch)

    def _begun(self, job: asyncio.Future[None], batch: list[_Item]) -> None:
        error = _job_error(job)
        if error is None:
            self._run_batch(batch)
        else:
            self._fail(batch, error)

    def _run_batch(self, batch: list[_Item]) -> None:
        """On the loop, in the transaction just begun: the operations; then the COMMIT on
        the thread."""
        loop, conn = self._loop, self._conn
        assert loop is not None and conn is not None
        try:
            outcomes, open_ = self._transaction(conn, batch, commit=False, begun=True)
        except BaseException as exc:  # not an operation's error: those are outcomes
            self._fail(batch, exc)
            raise
        if not open_:
            self._done(outcomes)
            return
        try:
            commit = loop.run_in_executor(self._thread, conn.execute, "COMMIT")
        except BaseException as exc:  # the executor is shut down: no COMMIT, no ack
            self._fail(batch, exc)
            raise
        commit.add_done_callback(lambda job: self._committed(job, batch, outcomes))

    def _prepared(self, job: asyncio.Future[Any]) -> None:
        error = _job_error(job)
        if error is not None:
            # The batch runs anyway, not the preparation again: its operations do without
            # (the index loads where it is used), or get the error themselves.
            log.error("store: preparing the next batch failed: %s", error)
        self._next(prepare=False)

    def _ran_on_thread(self, job: asyncio.Future[list[_Outcome]], batch: list[_Item]) -> None:
        error = _job_error(job)
        if error is None:
            self._done(job.result())
        else:  # not an operation's error (those are outcomes): a bug, or an interrupt
            self._fail(batch, error)

    def _committed(
        self, job: asyncio.Future[Any], batch: list[_Item], outcomes: list[_Outcome]
    ) -> None:
        error = _job_error(job)  # cancelled: COMMIT never ran, nothing is durable
        if error is None:
            self.commits += 1
            self._done(outcomes)
        else:
            self._fail(batch, error)

    def _fail(self, batch: list[_Item], error: BaseException) -> None:
        """The batch's transaction is lost: roll it back, every caller gets the error."""
        assert self._conn is not None
        self._done(self._lost(self._conn, batch, error))

    def _done(self, outcomes: list[_Outcome]) -> None:
        try:
            _complete(outcomes)
        finally:  # never leave the writer busy with nothing scheduled
            self._next_or_wait()

    def _next_or_wait(self) -> None:
        if self._pending or self._idle is not None:
            self._next()
        else:
            self._busy = False

    async def run_on_thread(self, fn: Op) -> Any:
        """Run ``fn`` with the connection on the writer's thread, outside any batch (at
        open, before any operation: the index load)."""
        assert self._loop is not None and self._conn is not None and not self._busy
        return await self._loop.run_in_executor(self._thread, fn, self._conn)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop, conn = self._loop, self._conn
        if loop is None or conn is None:
            return
        if self._busy:
            self._idle = loop.create_future()
            await self._idle

        def shut() -> None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

        await loop.run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=False)


def _job_error(job: asyncio.Future[Any]) -> BaseException | None:
    """A job's error; a cancelled job (it did not run) is one too."""
    if job.cancelled():
        return RuntimeError("the writer's thread did not run the job (cancelled)")
    return job.exception()


class _BatchLost(Exception):
    """An operation's error that also cost its batch the transaction."""


_Item = tuple[Op, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
_Outcome = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Any, BaseException | None]


def _complete(outcomes: list[_Outcome]) -> None:
    """On the event loop: hand each caller its result (unless it stopped waiting)."""
    for _, fut, result, error in outcomes:
        if fut.done():
            continue
        if error is None:
            fut.set_result(result)
        elif isinstance(error, StopIteration | StopAsyncIteration):
            # A future refuses these (they would end the awaiting coroutine's frame).
            fut.set_exception(StoreError(f"operation failed: {error!r}"))
        else:
            fut.set_exception(error)


def _store_error(exc: Exception) -> Exception:
    if isinstance(exc, StoreError | ValueError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return StoreConflict(str(exc))
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"database error: {exc}")
    return exc


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _sql(text: str) -> str | bytes:
    """``text`` as a statement gets it: itself, or, for text the SIP parser kept from bytes
    that were not UTF-8 (lone surrogates, which sqlite3 refuses to bind), those bytes, as a
    BLOB. The same text always gives the same value, so a lookup finds what was stored."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return wire_bytes(text)
    return text


def _from_sql(value: str | bytes) -> str:
    """A column :func:`_sql` wrote, as text again."""
    return value if isinstance(value, str) else value.decode("utf-8", "surrogateescape")


def _escaped_dumps(value: Any) -> str:
    """JSON in ASCII, lossless for the text the SIP parser keeps from bytes that are not
    UTF-8 (a Latin-1 User-Agent or display name, as lone surrogates): ``\\udcXX`` escapes
    SQLite stores and :func:`json.loads` gives back, so the Contact is echoed as sent."""
    return json.dumps(value, separators=(",", ":"))


def _binding_data(b: Binding) -> str:
    """The stored JSON of a binding, compact: a field at its default is left out, the
    Contact URI when the Contact value shows it as written, and the push parameters when
    they are the URI's ``pn-*`` parameters (:func:`_load_binding` puts them back). An iOS 13
    device's binding takes about 40 % less than :meth:`Binding.to_json`."""
    data: dict[str, Any] = {
        "aor": b.aor,
        "expires_at": b.expires_at,
        "registered_at": b.registered_at,
    }
    header = b.contact_header
    if header:
        data["contact_header"] = header
    if not header or contact_uri_text(header) != b.contact:
        data["contact"] = b.contact
    if b.instance_id is not None:
        data["instance_id"] = b.instance_id
    if b.reg_id is not None:
        data["reg_id"] = b.reg_id
    if b.call_id:
        data["call_id"] = b.call_id
    if b.cseq:
        data["cseq"] = b.cseq
    if b.q is not None:
        data["q"] = b.q
    if b.path:
        data["path"] = list(b.path)
    if b.received is not None:
        r = b.received
        data["received"] = [r.transport, r.host, r.port, r.local]
    if b.user_agent:
        data["user_agent"] = b.user_agent
    if b.push is None:
        if b.push_key is not None:
            data["push"] = None  # else the reader would take the URI's
    elif b.push_key is None or b.push != _uri_push_params(b.contact):
        data["push"] = b.push
    if b.push_key is not None:
        data["push_key"] = b.push_key
    if b.match_key:
        data["match_key"] = b.match_key
    try:
        return orjson.dumps(data).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate
        return _escaped_dumps(data)


def _load_binding(text: str | bytes) -> Binding:
    """A binding from its stored JSON, compact (:func:`_binding_data`) or full."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:  # a lone surrogate escape (:func:`_escaped_dumps`)
        data = json.loads(text)
    if "contact" not in data:
        data["contact"] = contact_uri_text(data["contact_header"])
    if "push" not in data and "push_key" in data:
        data["push"] = _uri_push_params(data["contact"])
    return Binding.from_json(data)


def _uri_push_params(uri: str) -> dict[str, str | None]:
    """The ``pn-*`` parameters of a URI as written (name and value text, None without a
    value). Only what :func:`_binding_data` checked to equal a binding's ``push`` is left
    to this, so a URI this simple split reads otherwise keeps its ``push`` stored."""
    params: dict[str, str | None] = {}
    for item in uri.split(";")[1:]:
        name, eq, value = item.partition("=")
        if name[:3].lower() == "pn-":
            params[name] = value if eq else None
    return params


def _page(offset: int, limit: int) -> tuple[int, int]:
    check_page(offset, limit)
    return offset, limit


def _paged(
    conn: sqlite3.Connection,
    table: str,
    columns: str,
    where: str,
    args: tuple[Any, ...],
    offset: int,
    limit: int,
    convert: Callable[[Any], T],
) -> Page[T]:
    """One page of ``table`` in insertion order, with the total matching ``where``.

    ``table``, ``columns`` and ``where`` are constants of this module (see :func:`_filters`),
    never input.
    """
    total = conn.execute(f"SELECT count(*) FROM {table} {where}", args).fetchone()[0]  # noqa: S608
    rows = conn.execute(
        f"SELECT {columns} FROM {table} {where} ORDER BY seq LIMIT ? OFFSET ?",  # noqa: S608
        (*args, limit, offset),
    )
    return Page([convert(r) for r in rows], total, offset, limit)


class SqliteBindings:
    """:class:`~sipwake.store.base.BindingStore` on SQLite."""

    def __init__(self, writer: _Writer, reader: _Reader) -> None:
        self._w = writer
        self._r = reader
        self._index = _Index()
        # A lost transaction may have undone index changes: reload before next use. After
        # the writer undid a batch to rerun it, or an operation of the rerun to its
        # savepoint, only the AORs changed since on_begin are read again.
        writer.on_rollback = self._index.invalidate
        writer.on_begin = self._index.begin
        writer.on_retry = self._index.restore
        writer.prepare = self._index.loader

    async def get(self, aor: str, now: float | None = None) -> list[Binding]:
        def op(conn: sqlite3.Connection) -> list[Binding]:
            rows = conn.execute(
                _LIVE_BINDINGS, (_sql(aor), now if now is not None else float("-inf"))
            )
            return [_load_binding(r[0]) for r in rows]

        result: list[Binding] = await self._r.call(op)
        return result

    async def upsert(self, binding: Binding, max_push_devices: int = 5) -> UpsertResult:
        data = _binding_data(binding)  # serialised here, before the batch: it holds the others
        if binding.expires_at <= binding.registered_at:
            raise ValueError("expires_at: a binding must expire after it was registered")
        # Everything the operation needs is read now: the caller may reuse the object.
        aor = binding.aor
        key = binding.key
        device = binding.device
        registered_at = binding.registered_at
        expires_at = binding.expires_at
        push_key = binding.push_key
        call_id = binding.call_id
        cseq = binding.cseq
        values = (aor, key, device, registered_at, expires_at, push_key, data)
        params: tuple[Any, ...] = values  # what the INSERT binds (_sql of the texts)
        if not (aor.isascii() and key.isascii() and device.isascii()):
            params = (_sql(aor), _sql(key), _sql(device), *values[3:])
        sql_aor = params[0]
        index = self._index

        def op(conn: sqlite3.Connection) -> UpsertResult:
            # The rules are decided on the writer's index of the AOR (no SQL reads); only
            # the resulting DELETEs and INSERTs go to SQLite.
            if not index.valid:
                index.load(conn)
            result = UpsertResult()
            rows = index.aors.get(aor)
            cur = index.cursor
            if not rows:
                # The AOR's first binding (the common case): nothing to decide or delete.
                index.add(aor, _insert_binding(cur, values, params, call_id, cseq))
                result.bindings = [binding]  # the AOR's only binding: no read needed
                return result
            gone: list[_Row] = []
            previous = rows.get(key)
            if (
                previous is not None
                and call_id
                and previous[_CALL_ID] == call_id
                and cseq <= previous[_CSEQ]
            ):
                raise StaleBinding(
                    f"CSeq {cseq} is not above {previous[_CSEQ]} of Call-ID "
                    f"{call_id} for this binding"
                )
            expired: list[_Row] = []
            replaced: list[_Row] = []
            if len(rows) > (previous is not None):  # rows besides the one refreshed
                tokens = push_key_tokens(push_key) if push_key else None
                for row in rows.values():
                    if row is previous:
                        continue
                    if row[_EXPIRES] <= registered_at:
                        expired.append(row)
                    elif tokens is not None and row[_DEVICE] != device and _shares(row, tokens):
                        replaced.append(row)
            if expired:
                result.expired = _take(conn, expired, gone)
            if previous is not None:
                # Decoded only if the caller reads it (not in the batch, and not at
                # all by the registrar, which only asks whether there was one).
                gone.append(previous)
                found = cur.execute(_DELETE_RETURNING_DATA, (previous[_ID],)).fetchone()
                if found is not None:
                    result.with_stored_previous(_load_binding, found[0])
            if replaced:
                result.replaced = _take(conn, replaced, gone)
            stored = _insert_binding(cur, values, params, call_id, cseq)
            # Each device has a row: rows kept plus the new one bound the devices counted.
            if push_key and 0 < max_push_devices < len(rows) - len(gone) + 1:
                doomed = _excess_devices(rows, gone, stored, max_push_devices)
                if doomed:
                    result.evicted = _take(conn, doomed, gone)
            # Only now, with every statement done, is the index changed.
            index.put(aor, stored, gone)
            if len(index.aors[aor]) == 1:
                result.bindings = [binding]  # the AOR's only binding: no read needed
            else:
                result.bindings = [
                    _load_binding(r[0])
                    for r in conn.execute(_LIVE_BINDINGS, (sql_aor, registered_at))
                ]
            return result

        result: UpsertResult = await self._w.call(op)
        return result

    async def remove(self, aor: str, key: str) -> list[Binding]:
        index = self._index

        def op(conn: sqlite3.Connection) -> list[Binding]:
            index.check(conn)
            rows = conn.execute(
                "DELETE FROM bindings WHERE aor = ? AND bkey = ? RETURNING id, aor, bkey, data",
                (_sql(aor), _sql(key)),
            ).fetchall()
            if not rows:
                rows = conn.execute(
                    "DELETE FROM bindings WHERE aor = ? AND device = ? "
                    "RETURNING id, aor, bkey, data",
                    (_sql(aor), _sql(key)),
                ).fetchall()
            return _removed(index, rows)

        result: list[Binding] = await self._w.call(op)
        return result

    async def remove_all(self, aor: str) -> list[Binding]:
        index = self._index

        def op(conn: sqlite3.Connection) -> list[Binding]:
            index.check(conn)
            rows = conn.execute(
                "DELETE FROM bindings WHERE aor = ? RETURNING id, aor, bkey, data",
                (_sql(aor),),
            ).fetchall()
            return _removed(index, rows)

        result: list[Binding] = await self._w.call(op)
        return result

    async def remove_by_push_token(self, provider: str, token: str) -> list[Binding]:
        index = self._index

        def op(conn: sqlite3.Connection) -> list[Binding]:
            index.check(conn)
            holders = index.tokens.get(_token_key(provider, token), ())
            rows = [
                r
                for h in sorted(holders, key=_row_id)
                if _shares(h, (provider, (token,)))
                for r in conn.execute(
                    "DELETE FROM bindings WHERE id = ? RETURNING id, aor, bkey, data", (h[_ID],)
                )
            ]
            return _removed(index, rows)

        result: list[Binding] = await self._w.call(op)
        return result

    async def expire(self, now: float) -> list[Binding]:
        index = self._index

        def op(conn: sqlite3.Connection) -> list[Binding]:
            index.check(conn)
            rows = conn.execute(
                "DELETE FROM bindings WHERE expires_at <= ? RETURNING id, aor, bkey, data",
                (now,),
            ).fetchall()
            return _removed(index, rows)

        # On the thread: a sweep after downtime may delete many rows.
        result: list[Binding] = await self._w.call(op, on_thread=True)
        return result

    async def due_for_wakeup(self, now: float, threshold_percent: float) -> list[Binding]:
        fraction = threshold_percent / 100.0

        def op(conn: sqlite3.Connection) -> list[Binding]:
            rows = conn.execute(
                "SELECT data FROM bindings WHERE push_key IS NOT NULL AND expires_at > ? "
                "AND registered_at + (expires_at - registered_at) * ? <= ? ORDER BY id",
                (now, fraction, now),
            )
            return [_load_binding(r[0]) for r in rows]

        result: list[Binding] = await self._r.call(op)
        return result

    async def count(self) -> int:
        result: int = await self._r.call(
            lambda conn: conn.execute("SELECT count(*) FROM bindings").fetchone()[0]
        )
        return result


_DELETE_RETURNING_DATA = "DELETE FROM bindings WHERE id = ? RETURNING data"
#: What _INSERT_BINDING takes: aor, bkey, device, registered_at, expires_at, push_key, data.
_BindingValues = tuple[str, str, str, float, float, str | None, str]
# What the index reads of each binding (_Index._file). The Call-ID comes as bytes: the
# JSON escape of a lone surrogate (_escaped_dumps) extracts to bytes that are not UTF-8.
_INDEX_ROWS = (
    "SELECT id, aor, bkey, device, registered_at, expires_at, push_key,"
    " CAST(json_extract(data, '$.call_id') AS BLOB), json_extract(data, '$.cseq')"
    " FROM bindings"
)
_LIVE_BINDINGS = "SELECT data FROM bindings WHERE aor = ? AND expires_at > ? ORDER BY id"
_INSERT_BINDING = (
    "INSERT INTO bindings (aor, bkey, device, registered_at, expires_at, push_key, data) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _token_key(provider: str, token: str) -> int:
    """What the index files a token under: a hash, smaller than the token it stands for."""
    return hash((provider, token))


#: What the upsert rules read of one stored binding: (row id, aor, key, device,
#: registered_at, expires_at, push_key, call_id, cseq). A plain tuple of plain values, as
#: are the index's containers of it: the garbage collector stops tracking such tuples (not
#: instances of a class, nor named tuples), so a million indexed bindings add nothing to
#: its passes. Fields by the constants below.
_Row = tuple[int, str, str, str, float, float, str | None, str, int]
_ID: Final = 0
_AOR: Final = 1
_KEY: Final = 2
_DEVICE: Final = 3
_REGISTERED: Final = 4
_EXPIRES: Final = 5
_PUSH_KEY: Final = 6
_CALL_ID: Final = 7
_CSEQ: Final = 8


def _insert_binding(
    cur: sqlite3.Cursor,
    values: _BindingValues,
    params: tuple[Any, ...],
    call_id: str,
    cseq: int,
) -> _Row:
    """INSERT a binding (``params``: ``values`` as bound, see :func:`_sql`); its index row."""
    cur.execute(_INSERT_BINDING, params)
    return (cur.lastrowid or 0, *values[:6], call_id, cseq)


def _token_keys(row: _Row) -> list[int]:
    """:func:`_token_key` of each of the row's push tokens."""
    push_key = row[_PUSH_KEY]
    if push_key is None:
        return []
    provider, *tokens = push_key.split(" ")
    return [hash((provider, t)) for t in tokens]  # _token_key(), inlined: on every upsert


def _shares(row: _Row, tokens: tuple[str, tuple[str, ...]]) -> bool:
    """Whether the row's binding holds one of ``tokens`` (same provider)."""
    push_key = row[_PUSH_KEY]
    if push_key is None:
        return False
    provider, *mine = push_key.split(" ")
    return provider == tokens[0] and not set(mine).isdisjoint(tokens[1])


#: The most AORs :meth:`_Index.restore` reads again one by one (else it loads everything).
RESTORE_MAX_AORS: Final = 1000


class _Index:
    """Every stored binding's :class:`_Row`, by AOR and key; used by writer operations only
    (run one at a time, on the loop or the writer's thread).

    The store is one process (SQLite), so this mirrors the bindings table: it is loaded
    when the store opens, changed by each binding operation after its statements succeeded,
    and reloaded from the database after a transaction was lost; after a batch the writer
    rolled back to run it again, only the AORs the batch changed are read again.
    """

    def __init__(self) -> None:
        self.aors: dict[str, dict[str, _Row]] = {}
        # _token_key() -> rows that may hold that token (a hash: check with _shares).
        self.tokens: dict[int, tuple[_Row, ...]] = {}
        self.valid = False
        # AORs changed since the writer's transaction began, and whether it loaded the
        # index: what restore() needs after the writer rolled a batch back to rerun it.
        self.touched: set[str] = set()
        self.loaded_in_batch = False
        # The writer connection's cursor for the upsert's statements, made by load():
        # conn.execute() would make (and register) a cursor object per statement.
        self.cursor: sqlite3.Cursor

    def load(self, conn: sqlite3.Connection) -> None:
        self.cursor = conn.cursor()
        self.aors = {}
        self.tokens = {}
        self._file(conn.execute(_INDEX_ROWS))
        self.valid = True
        self.loaded_in_batch = True

    def _file(self, rows: Iterable[Any]) -> None:
        """Add rows read with :data:`_INDEX_ROWS`."""
        for rid, aor_, key_, device_, reg, exp, push_key, call_id_, cseq in rows:
            aor, key, device = _from_sql(aor_), _from_sql(key_), _from_sql(device_)
            call_id = call_id_.decode("utf-8", "surrogatepass") if call_id_ else ""
            row: _Row = (rid, aor, key, device, reg, exp, push_key, call_id, cseq or 0)
            self.aors.setdefault(aor, {})[key] = row
            self._link(row)

    def begin(self) -> None:
        """A write transaction begins: nothing it changed yet."""
        self.touched.clear()
        self.loaded_in_batch = False

    def restore(self, conn: sqlite3.Connection) -> None:
        """The batch (or one operation of a rerun) was rolled back: read again the AORs it
        changed, not the whole table (a million bindings take seconds to load; the batch,
        a few hundred rows). Beyond :data:`RESTORE_MAX_AORS`, one query each would cost
        more than loading everything: load again."""
        if not self.valid or self.loaded_in_batch or len(self.touched) > RESTORE_MAX_AORS:
            self.valid = False  # loaded from rows the batch may have changed: load again
            self.touched.clear()
            return
        for aor in self.touched:
            rows = self.aors.pop(aor, None)
            if rows is not None:
                for row in rows.values():
                    self._unlink(row)
            self._file(conn.execute(_INDEX_ROWS + " WHERE aor = ?", (_sql(aor),)))
        self.touched.clear()

    def _link(self, row: _Row) -> None:
        tokens = self.tokens
        for tk in _token_keys(row):
            holders = tokens.get(tk)
            tokens[tk] = (row,) if holders is None else (*holders, row)

    def _unlink(self, row: _Row) -> None:
        tokens = self.tokens
        for tk in _token_keys(row):
            holders = tokens.get(tk)
            if holders is not None:
                kept = tuple(h for h in holders if h is not row)
                if kept:
                    tokens[tk] = kept
                else:
                    del tokens[tk]

    def _relink(self, old: _Row, new: _Row) -> None:
        """File ``new`` where ``old`` was under their tokens (the same push key)."""
        tokens = self.tokens
        for tk in _token_keys(new):
            holders = tokens.get(tk)
            tokens[tk] = (
                (new,) if holders is None else tuple(new if h is old else h for h in holders)
            )

    def invalidate(self) -> None:
        self.valid = False

    def loader(self) -> Callable[[sqlite3.Connection], None] | None:
        """What the writer runs on its thread before a batch: the load, if one is due."""
        return None if self.valid else self.load

    def check(self, conn: sqlite3.Connection) -> None:
        if not self.valid:
            self.load(conn)

    def add(self, aor: str, new: _Row) -> None:
        """File the row of an AOR that has none."""
        self.touched.add(aor)
        self.aors[aor] = {new[_KEY]: new}
        self._link(new)

    def put(self, aor: str, new: _Row, gone: list[_Row]) -> None:
        self.touched.add(aor)
        rows = self.aors.setdefault(aor, {})
        linked = False
        for row in gone:
            if rows.get(row[_KEY]) is row:
                del rows[row[_KEY]]
                if not linked and row[_PUSH_KEY] == new[_PUSH_KEY]:
                    self._relink(row, new)  # a refresh with the same tokens: one pass
                    linked = True
                else:
                    self._unlink(row)
        rows[new[_KEY]] = new
        if not linked:
            self._link(new)

    def drop(self, removed: list[tuple[int, str, str]]) -> None:
        """Forget rows deleted by SQL: (id, aor, key) each."""
        for rid, aor, key in removed:
            self.touched.add(aor)
            rows = self.aors.get(aor)
            if rows is None:
                continue
            row = rows.get(key)
            if row is not None and row[_ID] == rid:
                del rows[key]
                self._unlink(row)
                if not rows:
                    del self.aors[aor]


def _row_id(row: _Row) -> int:
    return row[_ID]


def _take(conn: sqlite3.Connection, rows: list[_Row], gone: list[_Row]) -> list[Binding]:
    """Delete ``rows`` (their token rows go by cascade) and return them, oldest first."""
    taken: list[Binding] = []
    for row in sorted(rows, key=_row_id):
        gone.append(row)
        found = conn.execute(_DELETE_RETURNING_DATA, (row[_ID],))
        data = found.fetchone()
        if data is not None:
            taken.append(_load_binding(data[0]))
    return taken


def _excess_devices(rows: dict[str, _Row], gone: list[_Row], new: _Row, limit: int) -> list[_Row]:
    """Push bindings of the least recently registered devices beyond ``limit`` (never the
    device of ``new``): devices ordered by their latest registration, then latest row."""
    gone_ids = {r[_ID] for r in gone}
    latest: dict[str, tuple[float, int]] = {}
    members: dict[str, list[_Row]] = {}
    for row in (*rows.values(), new):
        if row[_PUSH_KEY] is None or row[_ID] in gone_ids:
            continue
        device = row[_DEVICE]
        seen = latest.get(device)
        if seen is None:
            latest[device] = (row[_REGISTERED], row[_ID])
            members[device] = [row]
        else:
            latest[device] = (max(seen[0], row[_REGISTERED]), max(seen[1], row[_ID]))
            members[device].append(row)
    excess = len(latest) - limit
    doomed: list[_Row] = []
    if excess <= 0:
        return doomed
    for device, _ in sorted(latest.items(), key=lambda item: item[1]):
        if excess <= 0:
            break
        if device == new[_DEVICE]:
            continue
        doomed.extend(members[device])
        excess -= 1
    return doomed


def _removed(index: _Index, rows: list[Any]) -> list[Binding]:
    """Bindings deleted with ``RETURNING id, aor, bkey, data``: forgotten by the index,
    returned oldest first."""
    rows.sort()
    removed = [_load_binding(r[3]) for r in rows]  # may fail: before the index changes
    index.drop([(r[0], _from_sql(r[1]), _from_sql(r[2])) for r in rows])
    return removed


def _message(row: Sequence[Any]) -> HeldMessage:
    seq, mid, aor, target, request, received_at, expires_at = row
    return HeldMessage(
        aor=_from_sql(aor),
        request=bytes(request),
        received_at=received_at,
        expires_at=expires_at,
        target=None if target is None else _from_sql(target),
        id=mid,
        sequence=seq,
    )


_MESSAGE_COLUMNS = "seq, id, aor, target, request, received_at, expires_at"


class SqliteMessages:
    """:class:`~sipwake.store.base.MessageStore` on SQLite."""

    def __init__(self, writer: _Writer, reader: _Reader) -> None:
        self._w = writer
        self._r = reader

    async def add(self, message: HeldMessage) -> str:
        if not isinstance(message.request, bytes | bytearray) or not message.request:
            raise ValueError("request: the held MESSAGE must be non-empty bytes")
        mid = message.id or uuid.uuid4().hex
        row = (
            mid,
            _sql(message.aor),
            None if message.target is None else _sql(message.target),
            bytes(message.request),
            message.received_at,
            message.expires_at,
        )

        def op(conn: sqlite3.Connection) -> str:
            conn.execute(
                "INSERT INTO messages (id, aor, target, request, received_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            return mid

        result: str = await self._w.call(op)
        return result

    async def pending(self, aor: str, now: float | None = None) -> list[HeldMessage]:
        def op(conn: sqlite3.Connection) -> list[HeldMessage]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages "  # noqa: S608
                "WHERE aor = ? AND expires_at > ? ORDER BY seq",
                (_sql(aor), now if now is not None else float("-inf")),
            )
            return [_message(r) for r in rows]

        result: list[HeldMessage] = await self._r.call(op)
        return result

    async def delete(self, message_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount > 0

        result: bool = await self._w.call(op)
        return result

    async def expire(self, now: float) -> list[HeldMessage]:
        def op(conn: sqlite3.Connection) -> list[HeldMessage]:
            rows = conn.execute(
                "DELETE FROM messages WHERE expires_at <= ? "
                "RETURNING seq, id, aor, target, request, received_at, expires_at",
                (now,),
            ).fetchall()
            return [_message(r) for r in sorted(rows)]

        # On the thread: a sweep after downtime may delete many rows.
        result: list[HeldMessage] = await self._w.call(op, on_thread=True)
        return result

    async def count(self, aor: str | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            if aor is None:
                return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
            row = conn.execute(
                "SELECT count(*) FROM messages WHERE aor = ?", (_sql(aor),)
            ).fetchone()
            return int(row[0])

        result: int = await self._r.call(op)
        return result


_PUBLIC_FIELDS = (
    "key_id",
    "team_id",
    "bundle_id",
    "project_id",
    "cert_subject",
    "cert_expires_at",
    "created_at",
    "updated_at",
)


def _credential(row: Sequence[Any]) -> Credential:
    cid, alias, ctype, public = row
    fields = json.loads(public)
    return Credential(alias=alias, type=ctype, id=cid, **fields)


class SqliteCredentials:
    """:class:`~sipwake.store.base.CredentialStore` on SQLite; secrets sealed by SecretBox."""

    def __init__(
        self, writer: _Writer, reader: _Reader, box: SecretBox, now: Callable[[], float]
    ) -> None:
        self._w = writer
        self._r = reader
        self._box = box
        self._now = now

    async def add(self, credential: Credential) -> Credential:
        check_credential(credential)
        if not credential.secret:
            raise ValueError("secret: a new credential needs its secret")
        cid = credential.id or uuid.uuid4().hex
        now = self._now()
        stored = public_credential(credential, cid, now, now)
        sealed = self._box.encrypt(credential_aad(cid), credential.secret)

        def op(conn: sqlite3.Connection) -> Credential:
            conn.execute(
                "INSERT INTO credentials (id, alias, type, public, secret) VALUES (?, ?, ?, ?, ?)",
                (cid, stored.alias, stored.type, _public_json(stored), sealed),
            )
            return stored

        result: Credential = await self._w.call(op)
        return result

    async def get(self, credential_id: str) -> Credential | None:
        def op(conn: sqlite3.Connection) -> Credential | None:
            row = conn.execute(
                "SELECT id, alias, type, public FROM credentials WHERE id = ?", (credential_id,)
            ).fetchone()
            return _credential(row) if row else None

        result: Credential | None = await self._r.call(op)
        return result

    async def get_secret(self, credential_id: str) -> bytes:
        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT secret FROM credentials WHERE id = ?", (credential_id,)
            ).fetchone()
            return bytes(row[0]) if row else None

        sealed: bytes | None = await self._r.call(op)
        if sealed is None:
            raise NotFound(f"credential {credential_id} not found")
        return self._box.decrypt(credential_aad(credential_id), sealed)

    async def list(
        self,
        type: str | None = None,
        alias: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Credential]:
        offset, limit = _page(offset, limit)
        where, args = _filters(("type", type), ("alias", alias))

        def op(conn: sqlite3.Connection) -> Page[Credential]:
            return _paged(
                conn, "credentials", "id, alias, type, public", where, args, offset, limit,
                _credential,
            )  # fmt: skip

        result: Page[Credential] = await self._r.call(op)
        return result

    async def update(self, credential: Credential) -> Credential:
        check_credential(credential)
        cid = credential.id
        sealed = (
            self._box.encrypt(credential_aad(cid), credential.secret) if credential.secret else None
        )
        stored = public_credential(credential, cid, 0.0, self._now())

        def op(conn: sqlite3.Connection) -> Credential:
            row = conn.execute(
                "SELECT id, alias, type, public FROM credentials WHERE id = ?", (cid,)
            ).fetchone()
            if row is None:
                raise NotFound(f"credential {cid} not found")
            stored.created_at = _credential(row).created_at
            conn.execute(
                "UPDATE credentials SET alias = ?, type = ?, public = ?,"
                " secret = coalesce(?, secret) WHERE id = ?",
                (stored.alias, stored.type, _public_json(stored), sealed, cid),
            )
            return stored

        result: Credential = await self._w.call(op)
        return result

    async def delete(self, credential_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            used = conn.execute(
                "SELECT app FROM app_credentials WHERE credential = ? ORDER BY app",
                (credential_id,),
            ).fetchall()
            if used:
                names = ", ".join(r[0] for r in used)
                raise StoreConflict(f"credential {credential_id} is used by app(s) {names}")
            cur = conn.execute("DELETE FROM credentials WHERE id = ?", (credential_id,))
            return cur.rowcount > 0

        result: bool = await self._w.call(op)
        return result


def _public_json(c: Credential) -> str:
    return _dumps({name: getattr(c, name) for name in _PUBLIC_FIELDS})


def _filters(*pairs: tuple[str, str | None]) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause over fixed column names (never user text) and its arguments."""
    clauses = [f"{column} = ?" for column, value in pairs if value is not None]
    args = tuple(value for _, value in pairs if value is not None)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _app(row: Sequence[Any]) -> App:
    aid, name, provider, data = row
    return App(name=name, provider=provider, id=aid, **json.loads(data))


class SqliteApps:
    """:class:`~sipwake.store.base.AppStore` on SQLite."""

    def __init__(self, writer: _Writer, reader: _Reader, now: Callable[[], float]) -> None:
        self._w = writer
        self._r = reader
        self._now = now

    @staticmethod
    def _link(conn: sqlite3.Connection, app: App) -> None:
        for ident in app.app_ids:
            owner = conn.execute(
                "SELECT app FROM app_ids WHERE app_identifier = ?", (ident,)
            ).fetchone()
            if owner is not None and owner[0] != app.id:
                raise StoreConflict(f"AppId {ident} already belongs to app {owner[0]}")
        for cid in app.credential_ids:
            if conn.execute("SELECT 1 FROM credentials WHERE id = ?", (cid,)).fetchone() is None:
                raise StoreConflict(f"credential {cid} not found")
        conn.execute("DELETE FROM app_ids WHERE app = ?", (app.id,))
        conn.execute("DELETE FROM app_credentials WHERE app = ?", (app.id,))
        conn.executemany(
            "INSERT INTO app_ids (app_identifier, app) VALUES (?, ?)",
            [(ident, app.id) for ident in app.app_ids],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO app_credentials (app, credential) VALUES (?, ?)",
            [(app.id, cid) for cid in app.credential_ids],
        )

    @staticmethod
    def _data(app: App) -> str:
        return _dumps(
            {
                "app_ids": list(app.app_ids),
                "credential_ids": list(app.credential_ids),
                "created_at": app.created_at,
                "updated_at": app.updated_at,
            }
        )

    async def add(self, app: App) -> App:
        check_app(app)
        now = self._now()
        stored = App(
            name=app.name,
            provider=app.provider,
            app_ids=list(app.app_ids),
            credential_ids=list(app.credential_ids),
            id=app.id or uuid.uuid4().hex,
            created_at=now,
            updated_at=now,
        )

        def op(conn: sqlite3.Connection) -> App:
            conn.execute(
                "INSERT INTO apps (id, name, provider, data) VALUES (?, ?, ?, ?)",
                (stored.id, stored.name, stored.provider, self._data(stored)),
            )
            self._link(conn, stored)
            return stored

        result: App = await self._w.call(op)
        return result

    async def get(self, app_id: str) -> App | None:
        def op(conn: sqlite3.Connection) -> App | None:
            row = conn.execute(
                "SELECT id, name, provider, data FROM apps WHERE id = ?", (app_id,)
            ).fetchone()
            return _app(row) if row else None

        result: App | None = await self._r.call(op)
        return result

    async def find(self, app_identifier: str) -> App | None:
        def op(conn: sqlite3.Connection) -> App | None:
            row = conn.execute(
                "SELECT a.id, a.name, a.provider, a.data FROM app_ids i "
                "JOIN apps a ON a.id = i.app WHERE i.app_identifier = ?",
                (app_identifier,),
            ).fetchone()
            return _app(row) if row else None

        result: App | None = await self._r.call(op)
        return result

    async def list(
        self,
        provider: str | None = None,
        name: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[App]:
        offset, limit = _page(offset, limit)
        where, args = _filters(("provider", provider), ("name", name))

        def op(conn: sqlite3.Connection) -> Page[App]:
            return _paged(
                conn, "apps", "id, name, provider, data", where, args, offset, limit, _app
            )

        result: Page[App] = await self._r.call(op)
        return result

    async def update(self, app: App) -> App:
        check_app(app)
        now = self._now()

        stored = App(
            name=app.name,
            provider=app.provider,
            app_ids=list(app.app_ids),
            credential_ids=list(app.credential_ids),
            id=app.id,
            updated_at=now,
        )

        def op(conn: sqlite3.Connection) -> App:
            row = conn.execute(
                "SELECT id, name, provider, data FROM apps WHERE id = ?", (stored.id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"app {stored.id} not found")
            stored.created_at = _app(row).created_at
            conn.execute(
                "UPDATE apps SET name = ?, provider = ?, data = ? WHERE id = ?",
                (stored.name, stored.provider, self._data(stored), stored.id),
            )
            self._link(conn, stored)
            return stored

        result: App = await self._w.call(op)
        return result

    async def delete(self, app_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM apps WHERE id = ?", (app_id,)).rowcount > 0

        result: bool = await self._w.call(op)
        return result


def _rejected(row: Sequence[Any]) -> RejectedToken:
    return RejectedToken(*row)


class SqliteRejectedTokens:
    """:class:`~sipwake.store.base.RejectedTokenStore` on SQLite (hashes, never tokens)."""

    def __init__(self, writer: _Writer, reader: _Reader) -> None:
        self._w = writer
        self._r = reader

    async def add(self, provider: str, token: str, reason: str, at: float) -> RejectedToken:
        record = RejectedToken(
            provider, token_hash(provider, token), token_prefix(token), reason, at
        )

        def op(conn: sqlite3.Connection) -> RejectedToken:
            conn.execute(
                "INSERT INTO rejected_tokens (provider, token_hash, token_prefix, reason, at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider, token_hash) DO UPDATE SET "
                "reason = excluded.reason, at = excluded.at",
                (record.provider, record.token_hash, record.token_prefix, reason, at),
            )
            return record

        result: RejectedToken = await self._w.call(op)
        return result

    async def get(self, provider: str, token: str) -> RejectedToken | None:
        digest = token_hash(provider, token)

        def op(conn: sqlite3.Connection) -> RejectedToken | None:
            row = conn.execute(
                "SELECT provider, token_hash, token_prefix, reason, at FROM rejected_tokens "
                "WHERE provider = ? AND token_hash = ?",
                (provider, digest),
            ).fetchone()
            return _rejected(row) if row else None

        result: RejectedToken | None = await self._r.call(op)
        return result

    async def remove(self, provider: str, token: str) -> bool:
        digest = token_hash(provider, token)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM rejected_tokens WHERE provider = ? AND token_hash = ?",
                (provider, digest),
            )
            return cur.rowcount > 0

        result: bool = await self._w.call(op)
        return result

    async def purge(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM rejected_tokens WHERE at < ?", (before,)).rowcount

        result: int = await self._w.call(op, on_thread=True)  # may delete many rows
        return result

    async def list(self, offset: int = 0, limit: int = 50) -> Page[RejectedToken]:
        offset, limit = _page(offset, limit)

        def op(conn: sqlite3.Connection) -> Page[RejectedToken]:
            total = conn.execute("SELECT count(*) FROM rejected_tokens").fetchone()[0]
            rows = conn.execute(
                "SELECT provider, token_hash, token_prefix, reason, at FROM rejected_tokens "
                "ORDER BY at DESC, token_hash LIMIT ? OFFSET ?",
                (limit, offset),
            )
            return Page([_rejected(r) for r in rows], total, offset, limit)

        result: Page[RejectedToken] = await self._r.call(op)
        return result


def _lock_database(path: Path) -> int:
    """Take ``<database>-lock`` for this store's life; returns the descriptor holding it.

    One process writes the database: the bindings index (:class:`_Index`) mirrors the table
    only then. A second ``sipwake serve`` on the same file is refused with a precise error
    instead of deciding the registrar's rules on an index the other process makes stale.
    The lock goes with the process (also on ``kill -9``).
    """
    lock_path = path.with_name(path.name + "-lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{lock_path}: cannot create lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(
            f"{path}: in use by another sipwake process (one process per SQLite database; "
            "several nodes share a Redis store)"
        ) from None
    return fd


class SqliteStore:
    """The SQLite :class:`~sipwake.store.base.Store`: open with :meth:`open`, then close()."""

    def __init__(
        self,
        writer: _Writer,
        reader: _Reader,
        box: SecretBox,
        now: Callable[[], float],
        lock: int = -1,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._lock = lock  # the descriptor holding _lock_database(), or -1
        self._closing: asyncio.Future[None] | None = None
        self._bindings = SqliteBindings(writer, reader)
        self._messages = SqliteMessages(writer, reader)
        self._credentials = SqliteCredentials(writer, reader, box, now)
        self._apps = SqliteApps(writer, reader, now)
        self._rejected = SqliteRejectedTokens(writer, reader)
        self.path = writer._path

    @classmethod
    async def open(
        cls,
        path: Path,
        data_dir: Path,
        synchronous: str = "FULL",
        now: Callable[[], float] = time.time,
    ) -> SqliteStore:
        """Open (creating and migrating) the database at ``path``; secrets use the key in
        ``data_dir``."""
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous: expected NORMAL, FULL or EXTRA, got {synchronous!r}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{path.parent}: cannot create directory: {exc.strerror}") from None
        try:
            # Device tokens are secrets: the file (and the -wal and -shm files SQLite creates
            # with the same mode) is readable by sipwake's user only.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"{path}: cannot create database: {exc.strerror}") from None
        box = SecretBox.from_data_dir(data_dir)
        lock = _lock_database(path)
        writer = _Writer(path, synchronous.upper())
        try:
            await writer.start()  # creates and migrates the database before the reader opens
        except BaseException:
            os.close(lock)
            raise
        reader = _Reader(path, synchronous.upper())
        try:
            await reader.start()
            store = cls(writer, reader, box, now, lock)
            # The bindings index is loaded now, not in the first REGISTER's batch.
            await writer.run_on_thread(store._bindings._index.check)
        except BaseException:
            await writer.close()
            await reader.close()
            os.close(lock)
            raise
        return store

    @property
    def bindings(self) -> SqliteBindings:
        return self._bindings

    @property
    def messages(self) -> SqliteMessages:
        return self._messages

    @property
    def credentials(self) -> SqliteCredentials:
        return self._credentials

    @property
    def apps(self) -> SqliteApps:
        return self._apps

    @property
    def rejected_tokens(self) -> SqliteRejectedTokens:
        return self._rejected

    @property
    def commits(self) -> int:
        """Transactions committed so far (group commit makes this far below writes)."""
        return self._writer.commits

    async def close(self) -> None:
        """Every caller waits for the same closing (a second close() does not return
        first); a cancelled caller does not stop it halfway."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await self._writer.close()
        await self._reader.close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the lock
            self._lock = -1

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
