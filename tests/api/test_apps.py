"""The app registry: AppIds to destinations, and its provider lookup in the push service."""

from __future__ import annotations

import os

import pytest

from sipwake.config import parse_config
from sipwake.push.apps import AppError, AppInfo, AppRegistry, SecretFile
from sipwake.push.request import (
    Destination,
    Outcome,
    Provider,
    PushKind,
    PushRequest,
    PushResult,
    Service,
)
from sipwake.push.service import PushService

IOS = AppInfo(
    "k", "App", Provider.APNS, "org.example.app", ("org.example.app", "org.example.app.voip")
)


def test_ios13_app_ids_pick_the_token_service() -> None:
    voip = IOS.destination("org.example.app.voip", "ab" * 32)
    remote = IOS.destination("org.example.app", "cd" * 32)
    assert (voip.service, voip.app_id, voip.apns_topic) == (
        Service.VOIP, "org.example.app", "org.example.app.voip",
    )  # fmt: skip
    assert (remote.service, remote.apns_topic) == (Service.REMOTE, "org.example.app")


def test_bad_tokens_name_the_device_token() -> None:
    with pytest.raises(AppError, match="DeviceToken"):
        IOS.destination("org.example.app", "../../etc")


def test_fcm_and_webpush_destinations() -> None:
    fcm = AppInfo("f", "F", Provider.FCM, "proj-1", ("com.example.android",))
    dest = fcm.destination("com.example.android", "tok:en-1")
    assert (dest.provider, dest.app_id, dest.token) == (Provider.FCM, "proj-1", "tok:en-1")
    web = AppInfo("w", "W", Provider.WEBPUSH, "", ("web-app",))
    dest = web.destination("web-app", "https://push.example.org/sub/1")
    assert (dest.provider, dest.app_id) == (Provider.WEBPUSH, "web-app")
    with pytest.raises(AppError):
        web.destination("web-app", "http://insecure.example.org/x")


def test_secret_file_is_readable_by_path_and_gone_after_close() -> None:
    f = SecretFile(b"secret bytes")
    with open(f.path, "rb") as fh:
        assert fh.read() == b"secret bytes"
    path = f.path
    f.close()
    if os.path.exists(path):  # /proc/self/fd/N may now name another open file
        with open(path, "rb") as fh:
            assert fh.read() != b"secret bytes"


class FakeProvider:
    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[PushRequest] = []

    def accepts(self, destination: Destination) -> bool:
        return destination.is_apple

    async def send(self, request: PushRequest) -> PushResult:
        self.sent.append(request)
        return PushResult(Outcome.SENT, provider_id=self.name)

    async def aclose(self) -> None:
        pass


async def test_lookup_hook_wins_over_static_providers() -> None:
    app_provider, default = FakeProvider("app"), FakeProvider("default")
    routes = {"org.example.app": app_provider}
    service = PushService([default], lookup=lambda d: routes.get(d.app_id))
    mine = Destination(Provider.APNS, "org.example.app", "ab" * 32)
    other = Destination(Provider.APNS, "org.example.zzz", "ab" * 32)
    assert (await service.send(PushRequest(mine, PushKind.MESSAGE))).provider_id == "app"
    assert (await service.send(PushRequest(other, PushKind.MESSAGE))).provider_id == "default"
    assert service.stats.results[("app", "message", "sent")] == 1


async def test_config_app_with_missing_key_is_refused_naming_the_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = parse_config(
        {"apps": {"org.example.app": {"provider": "apns", "key-file": str(tmp_path / "no.p8"),
                                      "key-id": "K", "team-id": "T"}}}
    )  # fmt: skip
    registry = AppRegistry(config)
    from sipwake.config import ConfigError

    with pytest.raises(ConfigError, match=r'\[apps."org.example.app"\] key-file'):
        await registry.load()


async def test_concurrent_reloads_build_each_credential_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sipwake.push.apps import validate_credential
    from sipwake.store import App, open_url

    store = await open_url("", tmp_path)
    try:
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cred = await store.credentials.add(
            validate_credential(
                {"type": "ios-token", "private_key": key.decode(), "key_id": "K", "team_id": "T"}
            )
        )
        await store.apps.add(App("A", "apns", ["org.example.app"], [cred.id]))
        registry = AppRegistry(parse_config({}), store)
        built = []
        real = registry.factory.from_credential

        def counting(c, secret):  # type: ignore[no-untyped-def]
            built.append(c.id)
            return real(c, secret)

        registry.factory.from_credential = counting  # type: ignore[method-assign]
        await asyncio.gather(registry.load(), registry.reload(), registry.reload())
        assert built == [cred.id]
        dest = Destination(Provider.APNS, "org.example.app", "ab" * 32)
        assert registry.provider_for(dest) is not None
        await registry.aclose()
    finally:
        await store.close()
