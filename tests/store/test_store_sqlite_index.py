"""The SQLite store's in-memory index of bindings: what the upsert rules read instead of SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sipwake.store import Binding, HeldMessage, StaleBinding, StoreError, push_key_for
from sipwake.store.sqlite import (
    MIGRATIONS,
    RESTORE_MAX_AORS,
    SqliteStore,
    _binding_data,
    _Index,
    migrate,
)

AOR = "sip:alice@example.com"
T0 = 1_767_225_600.0


def msg(n: int) -> HeldMessage:
    return HeldMessage("sip:bob@example.com", b"MESSAGE %d" % n, 0.0, 1e12)


def make(
    contact: str,
    *,
    at: float = T0,
    instance: str | None = None,
    tokens: tuple[str, ...] | None = None,
    call_id: str = "",
    cseq: int = 0,
) -> Binding:
    push = {"pn-provider": "apns", "pn-prid": "&".join(tokens)} if tokens else None
    return Binding(
        aor=AOR,
        contact=contact,
        contact_header=f"<{contact}>",
        registered_at=at,
        expires_at=at + 3600,
        instance_id=instance,
        call_id=call_id,
        cseq=cseq,
        push=push,
        push_key=push_key_for("apns", tokens) if tokens else None,
    )


async def test_upsert_returns_the_bindings_get_would(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        for n in range(4):
            b = make(f"sip:alice@10.0.0.{n % 3}", at=T0 + n, tokens=(f"t{n}",))
            result = await store.bindings.upsert(b)
            assert result.bindings == await store.bindings.get(AOR, T0 + n)
        assert len(result.bindings or []) == 3


async def test_rules_hold_across_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.bindings.upsert(
            make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x",), call_id="c", cseq=5)
        )
    async with await SqliteStore.open(db, tmp_path) as store:
        with pytest.raises(StaleBinding):
            await store.bindings.upsert(
                make("sip:alice@10.0.0.2", instance="<urn:a>", call_id="c", cseq=5)
            )
        other = make("sip:alice@10.0.0.3", instance="<urn:b>", tokens=("x",), at=T0 + 1)
        result = await store.bindings.upsert(other)
        assert [b.instance_id for b in result.replaced] == ["<urn:a>"]
        assert result.bindings == [other]


async def test_a_rolled_back_batch_leaves_no_binding_behind(tmp_path: Path) -> None:
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        started, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        def lose_the_batch(conn: sqlite3.Connection) -> None:
            conn.execute("ROLLBACK")  # as SQLite does on an I/O error
            raise sqlite3.OperationalError("disk I/O error")

        blocker = asyncio.ensure_future(store._writer.call(hold, on_thread=True))
        assert await asyncio.to_thread(started.wait, 10)
        b = make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x",), call_id="c", cseq=1)
        upsert = asyncio.ensure_future(store.bindings.upsert(b))
        lost = asyncio.ensure_future(store._writer.call(lose_the_batch))
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(StoreError):
            await upsert
        with pytest.raises(StoreError):
            await lost
        await blocker
        assert await store.bindings.get(AOR) == []
        # The index forgot it too: the same CSeq is not stale, nothing is "refreshed".
        result = await store.bindings.upsert(b)
        assert result.previous is None and result.bindings == [b]


async def test_a_write_that_fails_leaves_the_bindings_as_they_were(tmp_path: Path) -> None:
    """A refresh deletes the old row before it inserts the new one: if the INSERT fails
    (here a value beyond SQLite's length limit), the old binding is still there and still
    known to the index; a first binding that fails leaves nothing."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        old = make("sip:alice@10.0.0.1", instance="<urn:a>", call_id="c", cseq=1)
        await store.bindings.upsert(old)
        await store._writer.call(lambda c: c.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000))
        huge = dataclasses.replace(old, cseq=2, user_agent="x" * 200_000)
        with pytest.raises(StoreError, match="too big"):
            await store.bindings.upsert(huge)
        assert await store.bindings.get(AOR) == [old]
        other = dataclasses.replace(huge, aor="sip:bob@example.com")
        with pytest.raises(StoreError, match="too big"):
            await store.bindings.upsert(other)
        assert await store.bindings.get("sip:bob@example.com") == []
        # The index agrees: the same refresh, at a size that fits, replaces the old binding.
        fits = dataclasses.replace(old, cseq=2)
        result = await store.bindings.upsert(fits)
        assert result.refreshed and result.bindings == [fits]
        first = dataclasses.replace(fits, aor="sip:bob@example.com")
        result = await store.bindings.upsert(first)
        assert not result.refreshed and result.bindings == [first]


async def test_a_write_failing_midway_in_a_batch_undoes_only_itself(tmp_path: Path) -> None:
    """A batch runs without savepoints; an operation that fails after it deleted a row
    makes the writer roll the batch back and run it again with savepoints: the other
    operations of the batch are committed, the failing one leaves nothing, and the index
    is right (a refresh earlier in the batch is not taken for a stale replay on the rerun,
    the rows are known afterwards) without loading the whole table again."""
    bob = "sip:bob@example.com"
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        old = make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x",), call_id="c", cseq=1)
        bob1 = dataclasses.replace(old, aor=bob, contact="sip:bob@10.0.0.2", call_id="b")
        await store.bindings.upsert(old)
        await store.bindings.upsert(bob1)
        await store._writer.call(lambda c: c.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000))
        started, release = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        index = store.bindings._index
        loads: list[int] = []
        load = index.load

        def counted_load(conn: sqlite3.Connection) -> None:
            loads.append(1)
            load(conn)

        index.load = counted_load  # type: ignore[method-assign]
        blocker = asyncio.ensure_future(store._writer.call(hold, on_thread=True))
        assert await asyncio.to_thread(started.wait, 10)
        before = store.commits
        bob2 = dataclasses.replace(bob1, cseq=2)
        carol = dataclasses.replace(old, aor="sip:carol@example.com", call_id="k")
        huge = dataclasses.replace(old, cseq=2, user_agent="x" * 200_000)
        calls = [
            asyncio.ensure_future(store.bindings.upsert(bob2)),  # a refresh, before
            asyncio.ensure_future(store.bindings.upsert(huge)),  # DELETE done, INSERT fails
            asyncio.ensure_future(store.bindings.upsert(carol)),  # a first binding, after
            asyncio.ensure_future(store.bindings.upsert(bob2)),  # a replay of the refresh
            asyncio.ensure_future(store.messages.add(msg(1))),
        ]
        await asyncio.sleep(0)  # every call is queued behind the blocker
        release.set()
        await blocker
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0].refreshed
        assert isinstance(results[1], StoreError) and "too big" in str(results[1])
        assert not results[2].refreshed
        assert isinstance(results[3], StaleBinding)
        assert isinstance(results[4], str)
        assert store.commits - before == 2  # the blocker's batch, then this one once
        assert loads == []  # the batch's AORs were read again, not the whole table
        assert await store.bindings.get(AOR) == [old]
        assert await store.bindings.get(bob) == [bob2]
        assert await store.bindings.get("sip:carol@example.com") == [carol]
        assert await store.messages.count() == 1
        # The index agrees with the table.
        with pytest.raises(StaleBinding):
            await store.bindings.upsert(bob2)
        result = await store.bindings.upsert(dataclasses.replace(old, cseq=2))
        assert result.refreshed and result.previous == old
        removed = await store.bindings.remove_by_push_token("apns", "x")
        assert sorted(b.aor for b in removed) == [AOR, bob, "sip:carol@example.com"]
        assert index.aors == {} and index.tokens == {}


async def test_an_operation_failing_before_it_wrote_costs_its_batch_nothing(
    tmp_path: Path,
) -> None:
    """A stale replay fails before it changed a row: the batch is not run again (each of
    its operations ran once) and the others are committed."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        b = make("sip:alice@10.0.0.1", instance="<urn:a>", call_id="c", cseq=1)
        await store.bindings.upsert(b)
        started, release = threading.Event(), threading.Event()
        runs: list[int] = []

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            release.wait(10)

        def counted(conn: sqlite3.Connection) -> int:
            runs.append(1)
            return conn.execute(
                "INSERT INTO rejected_tokens VALUES ('p', 'h', 't', 'r', 0)"
            ).rowcount

        blocker = asyncio.ensure_future(store._writer.call(hold, on_thread=True))
        assert await asyncio.to_thread(started.wait, 10)
        stale = asyncio.ensure_future(store.bindings.upsert(b))
        written = asyncio.ensure_future(store._writer.call(counted))
        await asyncio.sleep(0)
        release.set()
        await blocker
        with pytest.raises(StaleBinding):
            await stale
        assert await written == 1
        assert runs == [1]
        assert await store.bindings.get(AOR) == [b]


async def test_a_version_1_database_is_migrated_with_its_bindings(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    b = make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x", "y"), call_id="c", cseq=3)
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn, MIGRATIONS[:1])
    rid = conn.execute(
        "INSERT INTO bindings (aor, bkey, device, registered_at, expires_at, push_key, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (AOR, b.key, b.device, b.registered_at, b.expires_at, b.push_key, json.dumps(b.to_json())),
    ).lastrowid
    conn.execute("INSERT INTO binding_tokens VALUES ('apns', 'x', ?), ('apns', 'y', ?)", (rid, rid))
    conn.close()
    async with await SqliteStore.open(db, tmp_path) as store:
        assert await store.bindings.get(AOR) == [b]
        with pytest.raises(StaleBinding):
            await store.bindings.upsert(b)
        assert await store.bindings.remove_by_push_token("apns", "y") == [b]
        assert await store.bindings.count() == 0


async def test_a_second_process_on_the_same_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.bindings.upsert(make("sip:alice@10.0.0.1"))
        with pytest.raises(StoreError, match="in use by another sipwake process"):
            await SqliteStore.open(db, tmp_path)
        assert await store.bindings.count() == 1  # the first store goes on
    async with await SqliteStore.open(db, tmp_path) as store:  # released on close
        assert await store.bindings.count() == 1


def stored_data(db: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(db)
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT data FROM bindings ORDER BY id")]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("contact", "header", "uri_stored"),
    [
        # The usual case: the URI is the text inside <>, so it is not stored twice.
        (
            "sip:a@10.0.0.1;transport=udp;pn-prid=x",
            '<sip:a@10.0.0.1;transport=udp;pn-prid=x>;+sip.instance="<urn:uuid:1>"',
            False,
        ),
        ("sip:a@10.0.0.1", "sip:a@10.0.0.1;expires=60", False),  # addr-spec: params are header's
        ("sip:a@10.0.0.1", '"Alice <a>" <sip:a@10.0.0.1>', True),  # a display name: kept
        ("sip:a@10.0.0.1;ob", "<sip:a@10.0.0.1>", True),  # not what the header shows: kept
        ("sip:a@10.0.0.1", "", True),  # no Contact value
    ],
)
async def test_a_binding_is_stored_compact_and_read_back_unchanged(
    tmp_path: Path, contact: str, header: str, uri_stored: bool
) -> None:
    db = tmp_path / "s.db"
    b = make(contact, tokens=("t1", "t2"), call_id="c", cseq=1)
    b.contact_header = header
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.bindings.upsert(b)
        assert await store.bindings.get(AOR) == [b]
    (data,) = stored_data(db)
    assert ("contact" in data) is uri_stored
    # Fields at their default are not written (the reader fills them in).
    assert not {"instance_id", "reg_id", "q", "path", "user_agent", "match_key"} & data.keys()
    async with await SqliteStore.open(db, tmp_path) as store:  # and after a restart
        assert await store.bindings.get(AOR) == [b]
        with pytest.raises(StaleBinding):
            await store.bindings.upsert(b)  # the index read call_id and cseq from it


async def test_a_version_2_database_with_full_form_bindings_still_loads(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    full = make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x", "y"), call_id="c", cseq=3)
    other = make("sip:alice@10.0.0.2", tokens=("z",))
    other.q = 0.5
    conn = sqlite3.connect(db, isolation_level=None)
    migrate(conn, MIGRATIONS[:2])
    for b in (full, other):
        conn.execute(
            "INSERT INTO bindings (aor, bkey, device, registered_at, expires_at, push_key, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                AOR,
                b.key,
                b.device,
                b.registered_at,
                b.expires_at,
                b.push_key,
                json.dumps(b.to_json()),
            ),
        )
    conn.close()
    async with await SqliteStore.open(db, tmp_path) as store:
        assert await store.bindings.get(AOR) == [full, other]
        with pytest.raises(StaleBinding):
            await store.bindings.upsert(full)
        assert await store.bindings.remove_by_push_token("apns", "y") == [full]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 3
    finally:
        conn.close()


URI_PUSH = "pn-provider=apns;pn-prid=t1%26t2"


@pytest.mark.parametrize(
    ("contact", "push", "push_stored"),
    [
        # The registrar's form: the Contact URI's pn-* parameters as written.
        (f"sip:a@h;transport=udp;{URI_PUSH}", {"pn-provider": "apns", "pn-prid": "t1%26t2"}, False),
        (
            f"sip:a@h;{URI_PUSH};pn-silent",
            {"pn-provider": "apns", "pn-prid": "t1%26t2", "pn-silent": None},
            False,
        ),
        ("sip:a@h", {"pn-provider": "apns", "pn-prid": "t1&t2"}, True),  # header parameters
        (f"sip:a@h;{URI_PUSH}", {"pn-provider": "apns", "pn-prid": "t1"}, True),  # not the URI's
    ],
)
async def test_push_parameters_are_stored_only_when_the_uri_does_not_show_them(
    tmp_path: Path, contact: str, push: dict[str, str | None], push_stored: bool
) -> None:
    db = tmp_path / "s.db"
    b = make(contact, tokens=("t1", "t2"))
    b.push = push
    plain = make(f"sip:b@h;{URI_PUSH}", tokens=("t3",))
    plain.push = None  # a push key without parameters stays so
    async with await SqliteStore.open(db, tmp_path) as store:
        await store.bindings.upsert(b)
        await store.bindings.upsert(plain)
    data = stored_data(db)
    assert ("push" in data[0]) is push_stored
    async with await SqliteStore.open(db, tmp_path) as store:
        assert await store.bindings.get(AOR) == [b, plain]


async def test_the_index_adds_nothing_to_garbage_collection(tmp_path: Path) -> None:
    # A million bindings must not be rescanned by every collector pass: the index holds
    # plain tuples of plain values in dicts of them, which the collector stops tracking.
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        for n in range(3):
            await store.bindings.upsert(make(f"sip:alice@10.0.0.{n}", tokens=(f"t{n}", f"u{n}")))
        index = store.bindings._index
        for _ in range(3):  # a tuple is let go once what it holds was: a pass per level
            gc.collect()
        rows = index.aors[AOR]
        assert len(rows) == 3 and len(index.tokens) == 6
        for obj in (rows, *rows.values(), *index.tokens.values()):
            assert not gc.is_tracked(obj), obj
        # The rules still read it: another device registering with u1 replaces that one.
        result = await store.bindings.upsert(make("sip:alice@10.0.0.9", tokens=("u1",)))
        assert [b.contact for b in result.replaced] == ["sip:alice@10.0.0.1"]


def _index_and_table(store: SqliteStore) -> Callable[[sqlite3.Connection], tuple[Any, Any]]:
    """A writer operation: the index's rows and those a fresh load of the table gives."""

    def op(conn: sqlite3.Connection) -> tuple[Any, Any]:
        fresh = _Index()
        fresh.load(conn)
        return store.bindings._index.aors, fresh.aors

    return op


async def test_an_operation_failing_after_it_changed_the_index_undoes_that_too(
    tmp_path: Path,
) -> None:
    """A stored row that cannot be decoded (corruption, another version) makes an upsert
    and a removal fail after they changed the index: the writer reruns the batch with
    savepoints, and the operation's ROLLBACK TO also takes its index change back (the
    index keeps matching the table: the next refresh is neither stale nor a conflict)."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        a = make("sip:alice@10.0.0.1", instance="<urn:a>", call_id="c", cseq=1)
        b = make("sip:alice@10.0.0.2", instance="<urn:b>", call_id="c", cseq=1)
        await store.bindings.upsert(a)
        await store.bindings.upsert(b)
        await store._writer.call(
            lambda c: c.execute("UPDATE bindings SET data = '{}' WHERE bkey = '<urn:b>'")
        )
        # The refresh of a reads b (the AOR's live bindings) after it changed the index.
        with pytest.raises(KeyError):
            await store.bindings.upsert(dataclasses.replace(a, registered_at=T0 + 1, cseq=2))
        mine, table = await store._writer.call(_index_and_table(store))
        assert mine == table
        # A removal decodes what it deleted.
        with pytest.raises(KeyError):
            await store.bindings.remove_all(AOR)
        mine, table = await store._writer.call(_index_and_table(store))
        assert mine == table and len(table[AOR]) == 2
        refresh = dataclasses.replace(a, registered_at=T0 + 2, expires_at=T0 + 3602, cseq=2)
        await store._writer.call(
            lambda c: c.execute(
                "UPDATE bindings SET data = ? WHERE bkey = '<urn:b>'", (_binding_data(b),)
            )
        )
        result = await store.bindings.upsert(refresh)
        assert result.refreshed and result.bindings == [b, refresh]


async def test_a_returning_cursor_left_unfinished_still_counts_as_a_write(tmp_path: Path) -> None:
    """An operation that deleted rows with RETURNING, left the cursor unread and then
    failed, has written (SQLite counts the rows only when the statement is done): its
    batch is rolled back and run again with savepoints, and its deletion undone."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        for n in range(3):
            await store.messages.add(msg(n))

        def half_read(conn: sqlite3.Connection) -> None:
            deleted = conn.execute("DELETE FROM messages RETURNING seq")
            assert deleted.fetchone() is not None  # the cursor, still open, holds the rest
            raise ValueError("failed after its DELETE")

        with pytest.raises(ValueError, match="after its DELETE"):
            await store._writer.call(half_read)
        assert await store.messages.count() == 3


async def test_restoring_many_aors_loads_the_index_again(tmp_path: Path) -> None:
    """Past RESTORE_MAX_AORS changed AORs, one query each would cost more than a load."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        await store.bindings.upsert(make("sip:alice@10.0.0.1"))
        index = store.bindings._index

        def restore(names: int) -> Callable[[sqlite3.Connection], bool]:
            def op(conn: sqlite3.Connection) -> bool:
                index.begin()
                index.touched.update(f"sip:{n}@example.com" for n in range(names))
                index.restore(conn)
                return index.valid

            return op

        assert await store._writer.call(restore(RESTORE_MAX_AORS))
        assert not await store._writer.call(restore(RESTORE_MAX_AORS + 1))
        assert index.touched == set()
        result = await store.bindings.upsert(make("sip:alice@10.0.0.2", at=T0 + 1))
        assert len(result.bindings or []) == 2


async def test_statements_run_on_the_loop_and_waits_on_the_writers_thread(
    tmp_path: Path,
) -> None:
    """The writer's split: an operation's statements run on the event loop's thread (no GIL
    hand-off per statement); COMMIT's fsync and the index load after a lost transaction
    run on the writer's thread, so the loop never waits on the disk or a big read."""
    async with await SqliteStore.open(tmp_path / "s.db", tmp_path) as store:
        loop_thread = threading.get_ident()
        seen: list[tuple[bool, str]] = []

        def trace(statement: str) -> None:
            seen.append((threading.get_ident() == loop_thread, statement.split()[0].upper()))

        def lose_the_batch(conn: sqlite3.Connection) -> None:
            conn.execute("ROLLBACK")  # as SQLite does on an I/O error
            raise sqlite3.OperationalError("disk I/O error")

        await store._writer.call(lambda c: c.set_trace_callback(trace))
        with pytest.raises(StoreError):
            await store._writer.call(lose_the_batch)  # the index must load again
        seen.clear()
        b = make("sip:alice@10.0.0.1", instance="<urn:a>", tokens=("x",), call_id="c", cseq=1)
        assert (await store.bindings.upsert(b)).bindings == [b]
        await store._writer.call(lambda c: c.set_trace_callback(None))
        on_loop = {s for loop, s in seen if loop}
        on_thread = {s for loop, s in seen if not loop}
        assert {"BEGIN", "INSERT"} <= on_loop
        assert {"SELECT", "COMMIT"} <= on_thread  # the index load, the commit
        assert not {"SELECT", "COMMIT"} & on_loop
        assert [x.key for x in await store.bindings.get(AOR)] == [b.key]
