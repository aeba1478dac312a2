"""The registrar keeps each checked Contact value, so a refresh skips parsing it again."""

from __future__ import annotations

import gc

import pytest

from sipwake.clock import FakeClock
from sipwake.proxy import registrar as registrar_module
from sipwake.store import Store
from tests.proxy.test_registrar import IOS, SOURCE, make_registrar, register

AOR = "sip:alice@example.org"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


CONTACT = f'<sip:alice@10.0.0.1:5062;{IOS}>;+sip.instance="<urn:uuid:1>";reg-id=1'


async def test_a_refresh_of_the_same_contact_stores_the_same_binding(
    store: Store, clock: FakeClock
) -> None:
    reg, events = make_registrar(store, clock, "[push.apple]\nenabled = true\n")
    first = await reg.handle_register(register([CONTACT], expires=600), SOURCE)
    assert first.status == 200
    (stored,) = await reg.lookup(AOR)
    stored.push["pn-prid"] = "changed by a reader"  # type: ignore[index]
    clock.advance(10)
    again = await reg.handle_register(register([CONTACT], expires=300), SOURCE)
    assert again.status == 200
    assert [e.kind for e in events] == ["added", "refreshed"]
    (refreshed,) = await reg.lookup(AOR)
    assert refreshed.key == "<urn:uuid:1>;reg-id=1"
    assert refreshed.push == {
        "pn-provider": "apns.dev",
        "pn-param": "TEAM123456.org.example.app.voip%26remote",
        "pn-prid": "AAA:voip%26BBB:remote",
    }
    assert refreshed.push_key == "apns.dev AAA BBB"
    assert refreshed.expires_at - refreshed.registered_at == 300
    # Expires: 0 with the same Contact text removes it; a too brief one is still refused.
    brief = await reg.handle_register(register([CONTACT], expires=5), SOURCE)
    assert brief.status == 423
    gone = await reg.handle_register(register([CONTACT], expires=0), SOURCE)
    assert gone.status == 200 and await reg.lookup(AOR) == []


async def test_refused_contacts_are_checked_again_every_time(
    store: Store, clock: FakeClock
) -> None:
    reg, _ = make_registrar(store, clock)
    unknown = "<sip:alice@10.0.0.1:5062;pn-provider=nopns;pn-prid=T;pn-param=P>"
    for _ in range(2):
        r = await reg.handle_register(register([unknown], expires=600), SOURCE)
        assert r.status == 555
    bad = '<sip:alice@10.0.0.1:5062>;reg-id=x;+sip.instance="<urn:uuid:2>"'
    for _ in range(2):
        r = await reg.handle_register(register([bad], expires=600), SOURCE)
        assert r.status == 400


async def test_the_kept_contacts_are_bounded(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registrar_module, "CONTACT_CACHE_SIZE", 2)
    reg, _ = make_registrar(store, clock)
    for n in range(5):
        r = await reg.handle_register(register([f"<sip:alice@10.0.0.{n}>"], expires=600), SOURCE)
        assert r.status == 200
    assert len(reg._contacts) == 2
    assert len(await reg.lookup(AOR)) == 5


async def test_kept_contacts_add_nothing_to_garbage_collection(
    store: Store, clock: FakeClock
) -> None:
    # Thousands of kept values must not be rescanned by every collector pass: each is a
    # plain tuple of plain values, which the collector stops tracking.
    reg, _ = make_registrar(store, clock, "[push.apple]\nenabled = true\n")
    assert (await reg.handle_register(register([CONTACT], expires=600), SOURCE)).status == 200
    for _ in range(3):  # a tuple is let go once what it holds was: a pass per level
        gc.collect()
    (kept,) = reg._contacts.values()
    assert not gc.is_tracked(kept)
    assert not gc.is_tracked(reg._contacts)
    # And a refresh read from it stores the same parameters.
    clock.advance(10)
    assert (await reg.handle_register(register([CONTACT], expires=600), SOURCE)).status == 200
    (binding,) = await reg.lookup(AOR)
    assert binding.push == {
        "pn-provider": "apns.dev",
        "pn-param": "TEAM123456.org.example.app.voip%26remote",
        "pn-prid": "AAA:voip%26BBB:remote",
    }
