"""The SQLite store's in-memory index of bindings: what the upsert rules read instead of SQL."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from sipwake.store import Binding, StaleBinding, StoreError, push_key_for
from sipwake.store.sqlite import MIGRATIONS, SqliteStore, migrate

AOR = "sip:alice@example.com"
T0 = 1_767_225_600.0


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

        blocker = asyncio.ensure_future(store._writer.call(hold))
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
