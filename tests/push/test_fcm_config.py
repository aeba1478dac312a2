"""Building the FCM, Web Push and external providers from the TOML configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.config import load_config
from sipwake.push.providers.external import build_external_provider
from sipwake.push.providers.fcm import build_fcm_provider
from sipwake.push.providers.webpush import build_webpush_provider
from sipwake.push.request import Destination, Outcome, Provider, PushError
from sipwake.simulator.fcm import FcmSimulator
from sipwake.simulator.tls import Pki
from tests.push.fcm_helpers import fcm_request


async def test_firebase_section_drives_v1_over_tls_and_legacy(tmp_path: Path) -> None:
    clock = FakeClock()
    pki = Pki(tmp_path / "pki", clock=clock)
    pki.ensure()
    sim = await FcmSimulator(clock=clock).start(pki=pki, http2=True)
    try:
        sim.create_service_account("proj-a", tmp_path / "keys" / "a.json")
        legacy_key = sim.add_legacy_key("999")
        cfg = tmp_path / "sipwake.toml"
        cfg.write_text(
            f'[push]\nca-file = "pki/ca.pem"\n'
            f'[push.firebase]\nserver = "{sim.h2_url}"\n'
            f'service-accounts = {{ "proj-a" = "keys/a.json", "111" = "keys/a.json" }}\n'
            f'projects-api-keys = {{ "999" = "{legacy_key}" }}\n'
        )
        provider = build_fcm_provider(load_config(cfg), clock=clock)
        assert provider is not None
        try:
            assert provider.accepts(Destination(Provider.FCM, "111", "t"))
            assert not provider.accepts(Destination(Provider.FCM, "222", "t"))
            assert (await provider.send(fcm_request(project="111"))).ok
            assert (await provider.send(fcm_request(project="999"))).ok
            missing = await provider.send(fcm_request(project="222"))
        finally:
            await provider.aclose()
        assert missing.outcome is Outcome.FAILED and "222" in missing.reason
        assert len(sim.messages) == 1 and len(sim.legacy_messages) == 1
    finally:
        await sim.aclose()


def test_no_credentials_or_disabled_gives_no_provider(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert build_fcm_provider(load_config(cfg)) is None
    assert build_webpush_provider(load_config(cfg)) is None
    assert build_external_provider(load_config(cfg)) is None
    cfg.write_text('[push.firebase]\nenabled = false\nprojects-api-keys = { "1" = "k" }\n')
    assert build_fcm_provider(load_config(cfg)) is None


def test_unusable_files_are_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[push.firebase]\nservice-accounts = { "p" = "nope.json" }\n')
    with pytest.raises(PushError, match=r"service-accounts\.p: .*nope\.json: cannot read"):
        build_fcm_provider(load_config(cfg))
    cfg.write_text('[push.webpush]\nvapid-private-key = "v.pem"\nvapid-subject = "mailto:a@b"\n')
    with pytest.raises(PushError, match=r"vapid-private-key: .*v\.pem: cannot read"):
        build_webpush_provider(load_config(cfg))


def test_external_section_builds_the_pusher(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[push.external]\nuri = "http://127.0.0.1:9/p?t=$token"\nmethod = "POST"\n'
        'protocol = "http"\n'
    )
    provider = build_external_provider(load_config(cfg))
    assert provider is not None
    assert provider.method == "POST"
    assert provider.accepts(Destination(Provider.APNS, "org.example", "x"))
