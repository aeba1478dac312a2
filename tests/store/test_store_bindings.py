"""Contract of BindingStore: the registrar's rules, on every backend."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from sipwake.store import Binding, Received, StaleBinding, Store, push_key_for

if TYPE_CHECKING:
    from tests.store.conftest import Backend

AOR = "sip:alice@example.com"
T0 = 1_767_225_600.0


def make(
    contact: str = "sip:alice@10.0.0.1:5060",
    *,
    aor: str = AOR,
    at: float = T0,
    expires: float = 3600,
    instance: str | None = None,
    reg_id: int | None = None,
    tokens: tuple[str, ...] | None = None,
    provider: str = "apns",
) -> Binding:
    push = None
    key = None
    if tokens:
        push = {"pn-provider": provider, "pn-prid": "&".join(tokens), "pn-param": "T.b"}
        key = push_key_for(provider, tokens)
    return Binding(
        aor=aor,
        contact=contact,
        contact_header=f"<{contact}>;expires={int(expires)}",
        registered_at=at,
        expires_at=at + expires,
        instance_id=instance,
        reg_id=reg_id,
        push=push,
        push_key=key,
    )


async def test_binding_round_trips_every_field_across_reopen(
    backend: Backend, store: Store
) -> None:
    b = Binding(
        aor=AOR,
        contact="sip:Alice@10.0.0.1:5060;Transport=TCP;pn-prid=ABC;x=%41",
        contact_header='"Alice Ü" <sip:Alice@10.0.0.1:5060;Transport=TCP;pn-prid=ABC;x=%41>'
        ';+sip.instance="<urn:uuid:1>";reg-id=1;q=0.7',
        registered_at=T0,
        expires_at=T0 + 600,
        instance_id="<urn:uuid:1>",
        reg_id=1,
        call_id="c1@host",
        cseq=42,
        q=0.7,
        path=["<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr;ob>"],
        received=Received("tcp", "192.0.2.7", 50123, "tcp://127.0.0.1:5060"),
        user_agent="Linphone/5.2",
        push={"pn-provider": "apns", "pn-prid": "ABC", "pn-param": "T.b", "pn-silent": None},
        push_key=push_key_for("apns", ["ABC"]),
    )
    result = await store.bindings.upsert(b)
    assert result.previous is None and result.removed == []
    assert not result.refreshed
    assert await store.bindings.get(AOR) == [b]
    store = await backend.reopen(store)
    assert await store.bindings.get(AOR) == [b]
    assert await store.bindings.get("sip:bob@example.com") == []


async def test_text_that_was_not_utf8_on_the_wire_round_trips_across_reopen(
    backend: Backend, store: Store
) -> None:
    """A Latin-1 User-Agent or display name, kept by the SIP parser as lone surrogates,
    is stored and read back as it came, so the Contact is echoed byte for byte."""
    latin1 = b"Ren\xe9".decode("utf-8", "surrogateescape")
    b = make(instance="<urn:uuid:1>", reg_id=1, tokens=("ABC",))
    b.contact_header = f'"{latin1}" <{b.contact}>;expires=3600'
    b.user_agent = b"T\xe9l\xe9phone 1.0".decode("utf-8", "surrogateescape")
    await store.bindings.upsert(b)
    assert await store.bindings.get(AOR) == [b]
    store = await backend.reopen(store)
    assert await store.bindings.get(AOR) == [b]


async def test_a_call_id_that_was_not_utf8_on_the_wire_is_kept_as_it_came(
    backend: Backend, store: Store
) -> None:
    """A Call-ID with a Latin-1 byte (a lone surrogate from the SIP parser) is stored, and
    the next REGISTER's Call-ID is compared with it as the same bytes (stale CSeq)."""
    call_id = b"c\xe9@host".decode("utf-8", "surrogateescape")
    b = make()
    b.call_id, b.cseq = call_id, 2
    await store.bindings.upsert(b)
    assert await store.bindings.get(AOR) == [b]
    stale = make(at=T0 + 1)
    stale.call_id, stale.cseq = call_id, 2
    with pytest.raises(StaleBinding, match="CSeq 2"):
        await store.bindings.upsert(stale)
    store = await backend.reopen(store)
    assert await store.bindings.get(AOR) == [b]


async def test_an_aor_and_contact_that_were_not_utf8_on_the_wire_are_kept_as_they_came(
    backend: Backend, store: Store
) -> None:
    """``To: <sip:ren%E9@example.com>`` gives the AOR ``sip:ren\\udce9@example.com`` (the
    URI parser unescapes with surrogateescape); such a binding is stored, found, removed."""
    latin1 = b"\xe9".decode("utf-8", "surrogateescape")
    aor = f"sip:ren{latin1}@example.com"
    b = make(f"sip:ren{latin1}@10.0.0.1", aor=aor)
    await store.bindings.upsert(b)
    assert await store.bindings.get(aor) == [b]
    store = await backend.reopen(store)
    assert await store.bindings.get(aor) == [b]
    assert await store.bindings.remove(aor, b.key) == [b]
    assert await store.bindings.get(aor) == []


async def test_refresh_of_the_same_contact_replaces_it(store: Store) -> None:
    first = make(at=T0, expires=60)
    await store.bindings.upsert(first)
    again = make(at=T0 + 30, expires=3600)
    result = await store.bindings.upsert(again)
    # The registrar asks only whether there was one; the binding itself is still there
    # whole for a caller that reads it (the SQLite store decodes it on that first read).
    assert result.refreshed
    assert result.previous == first
    assert result.previous == first and result.refreshed
    assert await store.bindings.get(AOR) == [again]


async def test_older_cseq_of_the_same_call_id_is_refused(store: Store) -> None:
    current = make(at=T0)
    current.call_id, current.cseq = "reg-1", 5
    await store.bindings.upsert(current)
    for cseq in (5, 4):
        stale = make(at=T0 + 1, expires=60)
        stale.call_id, stale.cseq = "reg-1", cseq
        with pytest.raises(StaleBinding, match=f"CSeq {cseq}"):
            await store.bindings.upsert(stale)
    assert await store.bindings.get(AOR) == [current]
    newer = make(at=T0 + 2)
    newer.call_id, newer.cseq = "reg-1", 6
    assert (await store.bindings.upsert(newer)).previous == current
    rebooted = make(at=T0 + 3)  # a new Call-ID starts again from any CSeq
    rebooted.call_id, rebooted.cseq = "reg-2", 1
    assert (await store.bindings.upsert(rebooted)).previous == newer


async def test_contact_uri_match_key_lets_the_registrar_compare_uris(store: Store) -> None:
    a = make("sip:alice@HOST:5060")
    a.match_key = "sip:alice@host:5060"
    b = make("sip:alice@host:5060", at=T0 + 1)
    b.match_key = "sip:alice@host:5060"
    await store.bindings.upsert(a)
    result = await store.bindings.upsert(b)
    assert result.previous == a
    assert [x.contact for x in await store.bindings.get(AOR)] == ["sip:alice@host:5060"]


async def test_same_instance_and_reg_id_from_another_contact_replaces(store: Store) -> None:
    old = make("sip:alice@10.0.0.1:5060", instance="<urn:uuid:a>", reg_id=1)
    await store.bindings.upsert(old)
    new = make("sip:alice@10.0.0.9:6000", instance="<urn:uuid:a>", reg_id=1, at=T0 + 5)
    result = await store.bindings.upsert(new)
    assert result.previous == old
    assert await store.bindings.get(AOR) == [new]


async def test_same_instance_other_reg_id_is_a_second_flow(store: Store) -> None:
    one = make("sip:alice@10.0.0.1:5060", instance="<urn:uuid:a>", reg_id=1, tokens=("tok",))
    two = make("sip:alice@10.0.0.2:5060", instance="<urn:uuid:a>", reg_id=2, tokens=("tok",))
    await store.bindings.upsert(one)
    result = await store.bindings.upsert(two)
    assert result.previous is None and result.removed == []
    assert await store.bindings.get(AOR) == [one, two]


async def test_instance_without_reg_id_replaces_by_instance(store: Store) -> None:
    await store.bindings.upsert(make("sip:alice@10.0.0.1", instance="<urn:uuid:a>"))
    new = make("sip:alice@10.0.0.2", instance="<urn:uuid:a>", at=T0 + 1)
    result = await store.bindings.upsert(new)
    assert result.previous is not None and result.previous.contact == "sip:alice@10.0.0.1"
    assert await store.bindings.get(AOR) == [new]


async def test_same_push_token_from_another_contact_replaces(store: Store) -> None:
    old = make("sip:alice@10.0.0.1:5060", tokens=("TOKEN1",))
    other_aor = make("sip:alice@10.0.0.1:5060", aor="sip:work@example.com", tokens=("TOKEN1",))
    unrelated = make("sip:alice@10.0.0.3:5060", tokens=("TOKEN3",))
    for b in (old, other_aor, unrelated):
        await store.bindings.upsert(b)
    new = make("sip:alice@10.0.0.2:5062", tokens=("TOKEN1",), at=T0 + 10)
    result = await store.bindings.upsert(new)
    assert result.previous is None
    assert result.replaced == [old]
    assert await store.bindings.get(AOR) == [unrelated, new]
    # Another account on the same phone keeps its binding: the rule is per AOR.
    assert await store.bindings.get("sip:work@example.com") == [other_aor]


async def test_one_shared_token_of_a_voip_and_remote_device_replaces(store: Store) -> None:
    old = make("sip:alice@10.0.0.1", tokens=("VOIP1", "REMOTE1"))
    await store.bindings.upsert(old)
    new = make("sip:alice@10.0.0.2", tokens=("REMOTE1", "VOIP2"), at=T0 + 1)
    result = await store.bindings.upsert(new)
    assert result.replaced == [old]
    assert await store.bindings.get(AOR) == [new]


async def test_same_token_with_another_provider_is_another_device(store: Store) -> None:
    prod = make("sip:alice@10.0.0.1", tokens=("TOK",), provider="apns")
    dev = make("sip:alice@10.0.0.2", tokens=("TOK",), provider="apns.dev")
    await store.bindings.upsert(prod)
    result = await store.bindings.upsert(dev)
    assert result.replaced == []
    assert len(await store.bindings.get(AOR)) == 2


async def test_sixth_push_device_evicts_the_least_recently_registered(store: Store) -> None:
    plain = make("sip:alice@10.0.0.100", at=T0 - 100)  # no push: never counted nor evicted
    await store.bindings.upsert(plain)
    devices = [make(f"sip:alice@10.0.0.{i}", tokens=(f"T{i}",), at=T0 + i) for i in range(5)]
    for b in devices:
        assert (await store.bindings.upsert(b)).evicted == []
    # Device 0 registers again: device 1 becomes the least recently registered.
    refreshed = make("sip:alice@10.0.0.0", tokens=("T0",), at=T0 + 10)
    await store.bindings.upsert(refreshed)
    sixth = make("sip:alice@10.0.0.6", tokens=("T6",), at=T0 + 11)
    result = await store.bindings.upsert(sixth)
    assert result.evicted == [devices[1]]
    contacts = {b.contact for b in await store.bindings.get(AOR)}
    assert contacts == {
        "sip:alice@10.0.0.100",
        "sip:alice@10.0.0.0",
        "sip:alice@10.0.0.2",
        "sip:alice@10.0.0.3",
        "sip:alice@10.0.0.4",
        "sip:alice@10.0.0.6",
    }


async def test_eviction_ties_go_to_the_earliest_registration(store: Store) -> None:
    same_time = [make(f"sip:alice@10.0.0.{i}", tokens=(f"T{i}",)) for i in range(3)]
    for b in same_time:
        await store.bindings.upsert(b, max_push_devices=2)
    assert [b.contact for b in await store.bindings.get(AOR)] == [
        "sip:alice@10.0.0.1",
        "sip:alice@10.0.0.2",
    ]


async def test_flows_of_one_device_count_once_and_leave_together(store: Store) -> None:
    a1 = make("sip:a@10.0.0.1", instance="<urn:uuid:a>", reg_id=1, tokens=("TA",), at=T0)
    a2 = make("sip:a@10.0.0.2", instance="<urn:uuid:a>", reg_id=2, tokens=("TA",), at=T0 + 1)
    b = make("sip:b@10.0.0.3", tokens=("TB",), at=T0 + 2)
    for x in (a1, a2, b):
        assert (await store.bindings.upsert(x, max_push_devices=2)).evicted == []
    c = make("sip:c@10.0.0.4", tokens=("TC",), at=T0 + 3)
    result = await store.bindings.upsert(c, max_push_devices=2)
    assert result.evicted == [a1, a2]
    assert await store.bindings.get(AOR) == [b, c]


async def test_zero_max_push_devices_means_no_limit(store: Store) -> None:
    for i in range(8):
        b = make(f"sip:alice@10.0.0.{i}", tokens=(f"T{i}",), at=T0 + i)
        assert (await store.bindings.upsert(b, max_push_devices=0)).evicted == []
    assert await store.bindings.count() == 8


async def test_remove_by_contact_and_by_instance(store: Store) -> None:
    plain = make("sip:alice@10.0.0.1")
    f1 = make("sip:alice@10.0.0.2", instance="<urn:uuid:a>", reg_id=1)
    f2 = make("sip:alice@10.0.0.3", instance="<urn:uuid:a>", reg_id=2)
    for b in (plain, f1, f2):
        await store.bindings.upsert(b)
    assert await store.bindings.remove(AOR, "sip:alice@10.0.0.9") == []
    assert await store.bindings.remove(AOR, f1.key) == [f1]
    assert await store.bindings.get(AOR) == [plain, f2]
    assert await store.bindings.remove(AOR, "<urn:uuid:a>") == [f2]
    assert await store.bindings.remove(AOR, plain.contact) == [plain]
    assert await store.bindings.get(AOR) == []


async def test_remove_all_touches_only_that_aor(store: Store) -> None:
    mine = [make(f"sip:alice@10.0.0.{i}") for i in range(3)]
    bob = make("sip:bob@10.0.0.1", aor="sip:bob@example.com")
    for b in (*mine, bob):
        await store.bindings.upsert(b)
    assert await store.bindings.remove_all(AOR) == mine
    assert await store.bindings.get(AOR) == []
    assert await store.bindings.get("sip:bob@example.com") == [bob]


async def test_rejected_token_removes_its_bindings_in_every_aor(store: Store) -> None:
    dead = make("sip:alice@10.0.0.1", tokens=("VOIP", "DEAD"))
    dead_work = make("sip:w@10.0.0.1", aor="sip:work@example.com", tokens=("DEAD",))
    alive = make("sip:alice@10.0.0.2", tokens=("ALIVE",))
    for b in (dead, dead_work, alive):
        await store.bindings.upsert(b)
    assert await store.bindings.remove_by_push_token("apns.dev", "DEAD") == []
    removed = await store.bindings.remove_by_push_token("apns", "DEAD")
    assert sorted(b.aor for b in removed) == [AOR, "sip:work@example.com"]
    assert await store.bindings.get(AOR) == [alive]
    assert await store.bindings.count() == 1
    # The token index went with the binding: nothing left to remove.
    assert await store.bindings.remove_by_push_token("apns", "VOIP") == []


async def test_refresh_without_push_params_drops_the_token(store: Store) -> None:
    await store.bindings.upsert(make("sip:alice@10.0.0.1", tokens=("TOK",)))
    await store.bindings.upsert(make("sip:alice@10.0.0.1", at=T0 + 1))
    assert await store.bindings.remove_by_push_token("apns", "TOK") == []
    assert len(await store.bindings.get(AOR)) == 1


async def test_expire_removes_and_returns_only_expired(backend: Backend, store: Store) -> None:
    short = make("sip:alice@10.0.0.1", expires=60)
    long = make("sip:alice@10.0.0.2", expires=3600)
    await store.bindings.upsert(short)
    await store.bindings.upsert(long)
    assert await store.bindings.get(AOR, now=T0 + 60) == [long]
    assert await store.bindings.expire(T0 + 59) == []
    assert await store.bindings.expire(T0 + 60) == [short]
    store = await backend.reopen(store)
    assert await store.bindings.get(AOR) == [long]


async def test_upsert_sweeps_expired_bindings_of_the_aor(store: Store) -> None:
    stale = make("sip:alice@10.0.0.1", expires=60, tokens=("OLD",))
    await store.bindings.upsert(stale)
    fresh = make("sip:alice@10.0.0.2", at=T0 + 120)
    result = await store.bindings.upsert(fresh)
    assert result.expired == [stale]
    assert await store.bindings.get(AOR) == [fresh]


async def test_due_for_wakeup_past_the_threshold(store: Store) -> None:
    push = make("sip:alice@10.0.0.1", tokens=("TOK",), expires=3600)
    plain = make("sip:alice@10.0.0.2", expires=3600)
    await store.bindings.upsert(push)
    await store.bindings.upsert(plain)
    assert await store.bindings.due_for_wakeup(T0 + 1799, 50) == []
    assert await store.bindings.due_for_wakeup(T0 + 1800, 50) == [push]
    assert await store.bindings.due_for_wakeup(T0 + 1000, 25) == [push]
    assert await store.bindings.due_for_wakeup(T0 + 3600, 50) == []  # expired


async def test_bad_bindings_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="expires_at"):
        await store.bindings.upsert(make(expires=0))
    with pytest.raises(ValueError, match="white space"):
        push_key_for("apns", ["a b"])
    with pytest.raises(ValueError, match="token"):
        push_key_for("apns", [])
    assert await store.bindings.count() == 0


async def test_random_registrations_keep_every_rule(store: Store) -> None:
    """Many registrations drawn at random: after each one, the rules hold for the AOR."""
    rng = random.Random(5060)
    limit = 3
    count = 0
    for step in range(300):
        aor = f"sip:u{rng.randrange(3)}@example.com"
        use_instance = rng.random() < 0.5
        tokens = tuple(sorted({f"T{rng.randrange(8)}" for _ in range(rng.randrange(3))}))
        b = make(
            f"sip:u@10.0.0.{rng.randrange(12)}",
            aor=aor,
            at=T0 + step,
            expires=rng.choice([30, 3600]),
            instance=f"<urn:uuid:{rng.randrange(6)}>" if use_instance else None,
            reg_id=rng.choice([None, 1, 2]) if use_instance else None,
            tokens=tokens or None,
        )
        result = await store.bindings.upsert(b, max_push_devices=limit)
        count += 1 - (result.previous is not None) - len(result.removed)
        assert await store.bindings.count() == count
        now = await store.bindings.get(aor)
        assert b in now
        assert len({x.key for x in now}) == len(now)
        push_devices = {x.device for x in now if x.push_key}
        assert len(push_devices) <= limit
        owner: dict[str, str] = {}
        for x in now:
            for token in (x.push_tokens or ("", ()))[1]:
                assert owner.setdefault(token, x.device) == x.device
