"""Contract of CredentialStore, AppStore and RejectedTokenStore."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from sipwake.store import App, Credential, NotFound, Store, StoreConflict

if TYPE_CHECKING:
    from tests.store.conftest import Backend

P8 = (
    b"-----BEGIN PRIVATE KEY-----\nMIGTAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBHkwdwIBAQQgSECRETKEY"
    b"MATERIAL\n-----END PRIVATE KEY-----\n"
)
SA_JSON = b'{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----TOPSECRET"}'


def p8(alias: str = "prod-key", secret: bytes = P8) -> Credential:
    return Credential(
        alias=alias,
        type="ios-token",
        key_id="ABC123DEFG",
        team_id="TEAM123456",
        bundle_id="com.example.phone",
        secret=secret,
    )


async def test_secret_returned_only_by_get_secret(backend: Backend, store: Store) -> None:
    added = await store.credentials.add(p8())
    assert added.id and added.secret is None
    assert added.created_at == backend.clock.wall()
    got = await store.credentials.get(added.id)
    assert got == added and got is not None and got.secret is None
    assert "SECRET" not in repr(got)
    store = await backend.reopen(store)
    assert await store.credentials.get_secret(added.id) == P8
    assert (await store.credentials.list()).items[0].secret is None


async def test_secrets_are_not_in_the_stored_bytes(backend: Backend, store: Store) -> None:
    a = await store.credentials.add(p8())
    b = await store.credentials.add(
        Credential(alias="fcm-sa", type="android", project_id="proj-1", secret=SA_JSON)
    )
    raw = backend.stored_bytes()
    assert b"TEAM123456" in raw and b"proj-1" in raw  # public fields are there in clear
    assert b"SECRETKEYMATERIAL" not in raw and b"TOPSECRET" not in raw
    store = await backend.reopen(store)
    assert await store.credentials.get_secret(a.id) == P8
    assert await store.credentials.get_secret(b.id) == SA_JSON
    assert b"TOPSECRET" not in backend.stored_bytes()


async def test_list_filters_and_pages(store: Store) -> None:
    made = []
    for i in range(7):
        made.append(await store.credentials.add(p8(alias=f"k{i % 2}")))
    made.append(
        await store.credentials.add(Credential(alias="k0", type="webpush", secret=b"vapid"))
    )
    page = await store.credentials.list(limit=3)
    assert page.total == 8 and [c.id for c in page.items] == [c.id for c in made[:3]]
    page = await store.credentials.list(offset=6, limit=3)
    assert [c.id for c in page.items] == [c.id for c in made[6:]]
    page = await store.credentials.list(type="ios-token", alias="k0")
    assert page.total == 4 and {c.id for c in page.items} == {made[i].id for i in (0, 2, 4, 6)}
    page = await store.credentials.list(type="webpush")
    assert [c.id for c in page.items] == [made[7].id]
    assert (await store.credentials.list(alias="nope")).total == 0
    with pytest.raises(ValueError, match="limit"):
        await store.credentials.list(limit=0)
    with pytest.raises(ValueError, match="offset"):
        await store.credentials.list(offset=-1)


async def test_update_keeps_or_replaces_the_secret(backend: Backend, store: Store) -> None:
    added = await store.credentials.add(p8())
    backend.clock.advance(10)
    added.alias = "renamed"
    updated = await store.credentials.update(added)
    assert updated.alias == "renamed" and updated.updated_at == added.created_at + 10
    assert updated.created_at == added.created_at
    assert await store.credentials.get_secret(added.id) == P8
    updated.secret = b"new secret"
    await store.credentials.update(updated)
    assert await store.credentials.get_secret(added.id) == b"new secret"
    with pytest.raises(NotFound):
        await store.credentials.update(p8())


async def test_bad_credentials_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="type"):
        await store.credentials.add(Credential(alias="x", type="blackberry", secret=b"s"))
    with pytest.raises(ValueError, match="secret"):
        await store.credentials.add(Credential(alias="x", type="ios"))
    with pytest.raises(NotFound):
        await store.credentials.get_secret("missing")
    assert await store.credentials.get("missing") is None
    assert (await store.credentials.list()).total == 0


async def test_apps_map_app_ids_to_provider_and_credentials(backend: Backend, store: Store) -> None:
    cred = await store.credentials.add(p8())
    app = await store.apps.add(
        App(
            name="Phone",
            provider="apns",
            app_ids=["com.example.phone", "com.example.phone.voip"],
            credential_ids=[cred.id],
        )
    )
    assert app.id
    store = await backend.reopen(store)
    assert await store.apps.get(app.id) == app
    assert await store.apps.find("com.example.phone.voip") == app
    assert await store.apps.find("com.example.phone") == app
    assert await store.apps.find("com.other") is None


async def test_app_ids_belong_to_one_app_and_credentials_must_exist(store: Store) -> None:
    cred = await store.credentials.add(p8())
    first = await store.apps.add(App(name="A", provider="apns", app_ids=["com.a"]))
    with pytest.raises(StoreConflict, match=r"AppId com\.a already"):
        await store.apps.add(App(name="B", provider="apns", app_ids=["com.b", "com.a"]))
    with pytest.raises(StoreConflict, match="missing"):
        await store.apps.add(
            App(name="B", provider="apns", app_ids=["com.b"], credential_ids=["missing"])
        )
    assert await store.apps.find("com.b") is None  # refused adds left nothing behind
    assert (await store.apps.list()).total == 1
    with pytest.raises(ValueError, match="app_ids"):
        await store.apps.add(App(name="C", provider="fcm"))
    first.app_ids = ["com.a2"]
    first.credential_ids = [cred.id]
    await store.apps.update(first)
    assert await store.apps.find("com.a") is None
    assert await store.apps.find("com.a2") == await store.apps.get(first.id)


async def test_a_used_credential_cannot_be_deleted(store: Store) -> None:
    cred = await store.credentials.add(p8())
    app = await store.apps.add(
        App(name="A", provider="apns", app_ids=["com.a"], credential_ids=[cred.id])
    )
    with pytest.raises(StoreConflict, match=app.id):
        await store.credentials.delete(cred.id)
    assert await store.credentials.get(cred.id) is not None
    assert await store.apps.delete(app.id) is True
    assert await store.apps.delete(app.id) is False
    assert await store.apps.find("com.a") is None
    assert await store.credentials.delete(cred.id) is True
    assert await store.credentials.delete(cred.id) is False


async def test_app_listing_filters_and_pages(store: Store) -> None:
    for i in range(5):
        await store.apps.add(
            App(name=f"app{i}", provider="fcm" if i % 2 else "apns", app_ids=[f"id{i}"])
        )
    page = await store.apps.list(provider="apns", limit=2)
    assert page.total == 3 and [a.name for a in page.items] == ["app0", "app2"]
    page = await store.apps.list(provider="apns", offset=2, limit=2)
    assert [a.name for a in page.items] == ["app4"]
    assert [a.name for a in (await store.apps.list(name="app3")).items] == ["app3"]


async def test_rejected_tokens_remembered_by_hash(backend: Backend, store: Store) -> None:
    token = "f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f"
    rec = await store.rejected_tokens.add("apns", token, "Unregistered", 100.0)
    assert rec.token_prefix.startswith("f0e1d2c3") and token not in rec.token_prefix
    store = await backend.reopen(store)
    got = await store.rejected_tokens.get("apns", token)
    assert got == rec
    assert await store.rejected_tokens.get("fcm", token) is None
    assert token.encode() not in backend.stored_bytes()
    again = await store.rejected_tokens.add("apns", token, "BadDeviceToken", 200.0)
    assert (await store.rejected_tokens.get("apns", token)) == again
    await store.rejected_tokens.add("fcm", "other-token-123", "UNREGISTERED", 150.0)
    page = await store.rejected_tokens.list()
    assert page.total == 2 and [r.provider for r in page.items] == ["apns", "fcm"]
    assert await store.rejected_tokens.purge(before=160.0) == 1
    assert await store.rejected_tokens.remove("apns", token) is True
    assert await store.rejected_tokens.remove("apns", token) is False
    assert (await store.rejected_tokens.list()).total == 0
