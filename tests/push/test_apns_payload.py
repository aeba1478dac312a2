"""APNs payloads, headers, provider tokens and credential files (no network)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sipwake.clock import FakeClock
from sipwake.push.providers.apns import (
    ApnsConfigError,
    ApnsProvider,
    ApnsSettings,
    JwtSigner,
    PayloadTooLarge,
    build_message,
    cert_dir_index,
    load_p8_key,
)
from sipwake.push.request import (
    AlertStrings,
    CallEndReason,
    Destination,
    Provider,
    PushError,
    PushKind,
    PushRequest,
    Service,
)

from .apns_helpers import write_cert_pem, write_p8, write_rsa

TOKEN = "ab" * 32
UUID = "6f1e4c2a-9d3b-4e57-8a1f-0c2d3e4f5a6b"
NOW = 1_767_225_600  # FakeClock's wall start: 2026-01-01 00:00:00 UTC
SEND_TIME = "2026-01-01 00:00:00"
REMOTE = Destination(Provider.APNS, "org.example.app", TOKEN, Service.REMOTE, "ABCDE12345")
VOIP = Destination(Provider.APNS, "org.example.app", TOKEN, Service.VOIP, "ABCDE12345")


def req(kind: PushKind, dest: Destination = REMOTE, **kw: object) -> PushRequest:
    base: dict[str, object] = {
        "call_id": "call-1@example.org",
        "from_uri": "sip:alice@example.org",
        "display_name": "Alice",
        "display_from_uri": True,
        "ttl": 30,
        "uuid": UUID,
    }
    base.update(kw)
    return PushRequest(dest, kind, **base)  # type: ignore[arg-type]


def decoded(msg_body: bytes) -> dict[str, object]:
    data = json.loads(msg_body)
    assert isinstance(data, dict)
    return data


def test_call_is_pushkit_with_flexisip_layout() -> None:
    msg = build_message(req(PushKind.CALL, VOIP, custom_payload={"k": 1}), FakeClock())
    assert msg.path == f"/3/device/{TOKEN}"
    assert dict(msg.headers) == {
        "apns-push-type": "voip",
        "apns-topic": "org.example.app.voip",
        "apns-expiration": str(NOW + 30),
        "apns-priority": "10",
        "apns-id": UUID,
    }
    assert decoded(msg.body) == {
        "aps": {
            "sound": "",
            "loc-key": "IC_MSG",
            "loc-args": ["Alice"],
            "call-id": "call-1@example.org",
            "uuid": UUID,
            "send-time": SEND_TIME,
        },
        "from-uri": "sip:alice@example.org",
        "display-name": "Alice",
        "call-id": "call-1@example.org",
        "pn_ttl": 30,
        "uuid": UUID,
        "send-time": SEND_TIME,
        "customPayload": {"k": 1},
    }


def test_json_is_compact_and_utf8() -> None:
    msg = build_message(req(PushKind.MESSAGE, display_name="Zoë"), FakeClock())
    assert b": " not in msg.body and b", " not in msg.body
    assert "Zoë".encode() in msg.body  # not \u escapes: they waste the 4 KiB budget


def test_message_alert_with_badge_sound_and_overrides() -> None:
    strings = AlertStrings(message_loc_key="MY_MSG", message_sound="msg.caf")
    msg = build_message(
        req(PushKind.MESSAGE, strings=strings, chat_room_addr="sip:room@x", mutable_content=True),
        FakeClock(),
    )
    body = decoded(msg.body)
    assert body["aps"] == {
        "alert": {"loc-key": "MY_MSG", "loc-args": ["Alice"]},
        "sound": "msg.caf",
        "badge": 1,
        "mutable-content": 1,
    }
    assert body["chat-room-addr"] == "sip:room@x"
    assert body["customPayload"] == {}
    h = dict(msg.headers)
    assert (h["apns-push-type"], h["apns-topic"], h["apns-priority"]) == (
        "alert",
        "org.example.app",
        "10",
    )
    assert "apns-collapse-id" not in h


def test_group_chat_loc_key_and_no_badge() -> None:
    msg = build_message(req(PushKind.MESSAGE, group_chat=True, no_badge=True), FakeClock())
    aps = decoded(msg.body)["aps"]
    assert aps == {
        "alert": {"loc-key": "GC_MSG", "loc-args": ["Alice"]},
        "sound": "default",
        "badge": 0,
    }


def test_caller_hidden_without_display_from_uri() -> None:
    body = decoded(build_message(req(PushKind.MESSAGE, display_from_uri=False), FakeClock()).body)
    assert (body["from-uri"], body["display-name"]) == ("", "")
    assert body["aps"]["alert"]["loc-args"] == [""]  # type: ignore[index]


def test_uri_shown_when_no_display_name() -> None:
    body = decoded(build_message(req(PushKind.RINGING, display_name=""), FakeClock()).body)
    assert body["aps"]["alert"]["loc-args"] == ["sip:alice@example.org"]  # type: ignore[index]


def test_ringing_alert_collapses_on_call_id() -> None:
    strings = AlertStrings(call_sound="r.caf")
    msg = build_message(req(PushKind.RINGING, strings=strings), FakeClock())
    h = dict(msg.headers)
    assert h["apns-collapse-id"] == "call-1@example.org"
    assert h["apns-push-type"] == "alert"
    assert decoded(msg.body)["aps"] == {
        "alert": {"loc-key": "IC_MSG", "loc-args": ["Alice"]},
        "sound": "r.caf",
        "badge": 1,
    }


def test_long_call_id_collapse_id_fits_apple_limit() -> None:
    call_id = "x" * 100
    h = dict(build_message(req(PushKind.RINGING, call_id=call_id), FakeClock()).headers)
    assert len(h["apns-collapse-id"]) == 64
    other = dict(build_message(req(PushKind.CALL_ENDED, call_id=call_id), FakeClock()).headers)
    assert other["apns-collapse-id"] == h["apns-collapse-id"]  # so the final alert replaces it


@pytest.mark.parametrize(
    ("reason", "key"),
    [
        (CallEndReason.MISSED, "IC_MISSED"),
        (CallEndReason.ANSWERED_ELSEWHERE, "IC_ANSWERED_ELSEWHERE"),
        (CallEndReason.DECLINED_ELSEWHERE, "IC_DECLINED_ELSEWHERE"),
    ],
)
def test_final_call_alert(reason: CallEndReason, key: str) -> None:
    msg = build_message(req(PushKind.CALL_ENDED, end_reason=reason), FakeClock())
    assert decoded(msg.body)["aps"] == {
        "alert": {"loc-key": key, "loc-args": ["Alice"]},
        "badge": 1,
    }
    assert dict(msg.headers)["apns-collapse-id"] == "call-1@example.org"


def test_background_is_silent_priority_5() -> None:
    msg = build_message(req(PushKind.BACKGROUND), FakeClock())
    h = dict(msg.headers)
    assert (h["apns-push-type"], h["apns-priority"], h["apns-topic"]) == (
        "background",
        "5",
        "org.example.app",
    )
    assert decoded(msg.body)["aps"] == {"content-available": 1}


def test_expiration_follows_clock_and_ttl_zero_means_now_or_never() -> None:
    clock = FakeClock()
    clock.advance(100)
    h = dict(build_message(req(PushKind.MESSAGE, ttl=3600), clock).headers)
    assert h["apns-expiration"] == str(NOW + 100 + 3600)
    assert decoded(build_message(req(PushKind.MESSAGE), clock).body)["send-time"] == (
        "2026-01-01 00:01:40"
    )
    h = dict(build_message(req(PushKind.MESSAGE, ttl=0), clock).headers)
    assert h["apns-expiration"] == "0"


def test_explicit_collapse_id_and_non_uuid_id() -> None:
    request = req(PushKind.MESSAGE, collapse_id="c1", uuid="nope")
    h = dict(build_message(request, FakeClock()).headers)
    assert h["apns-collapse-id"] == "c1"
    assert "apns-id" not in h  # Apple would answer BadMessageId


def test_oversized_payload_refused_before_sending() -> None:
    big = {"blob": "x" * 4200}
    with pytest.raises(PayloadTooLarge, match=r"payload too large: \d+ bytes > 4096"):
        build_message(req(PushKind.MESSAGE, custom_payload=big), FakeClock())
    # PushKit allows 5120 bytes
    msg = build_message(req(PushKind.CALL, VOIP, custom_payload=big), FakeClock())
    assert 4096 < len(msg.body) <= 5120
    with pytest.raises(PayloadTooLarge, match=r"> 5120$"):
        build_message(req(PushKind.CALL, VOIP, custom_payload={"b": "x" * 5200}), FakeClock())


def test_non_apple_destination_refused() -> None:
    with pytest.raises(PushError, match="not an APNs destination"):
        build_message(req(PushKind.MESSAGE, Destination(Provider.FCM, "p", "t")), FakeClock())


def test_token_that_would_change_the_path_refused() -> None:
    dest = Destination(Provider.APNS, "org.example.app", "abcd/../../x?y")
    with pytest.raises(PushError, match=r"invalid APNs device token abcd/\.\./…"):
        build_message(req(PushKind.MESSAGE, dest), FakeClock())


def test_settings_from_config_resolve_paths(tmp_path: Path) -> None:
    from sipwake.config import load_config

    conf = tmp_path / "sipwake.toml"
    conf.write_text(
        '[push]\nca-file = "ca.pem"\n'
        '[push.apple]\nkey-file = "keys/AuthKey.p8"\nkey-id = "K"\nteam-id = "T"\n'
        'certificate-dir = "/etc/apns"\nserver = "https://127.0.0.1:9"\n'
    )
    settings = ApnsSettings.from_config(load_config(conf), request_timeout=3.0)
    assert settings.key_file == str(tmp_path / "keys/AuthKey.p8")
    assert settings.ca_file == str(tmp_path / "ca.pem")
    assert settings.certificate_dir == "/etc/apns"
    assert (settings.key_id, settings.team_id) == ("K", "T")
    assert settings.server == "https://127.0.0.1:9"
    assert settings.dev_server == "https://api.sandbox.push.apple.com"
    assert settings.request_timeout == 3.0


# --- JWT ---------------------------------------------------------------------------------


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, public: ec.EllipticCurvePublicKey) -> tuple[dict[str, object], ...]:
    head, claims, sig = token.split(".")
    raw = _b64d(sig)
    assert len(raw) == 64  # raw r||s, not DER
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    return json.loads(_b64d(head)), json.loads(_b64d(claims))


def test_jwt_es256_signed_and_verifiable(tmp_path: Path) -> None:
    key = write_p8(tmp_path / "AuthKey.p8")
    clock = FakeClock()
    signer = JwtSigner(load_p8_key(tmp_path / "AuthKey.p8"), "KEY1234567", "TEAM123456", clock)
    header, claims = verify_jwt(signer.token(), key.public_key())
    assert header == {"alg": "ES256", "kid": "KEY1234567"}
    assert claims == {"iss": "TEAM123456", "iat": NOW}


def test_jwt_reused_then_renewed_after_max_age(tmp_path: Path) -> None:
    write_p8(tmp_path / "k.p8")
    clock = FakeClock()
    signer = JwtSigner(load_p8_key(tmp_path / "k.p8"), "K", "T", clock, max_age=1500)
    first = signer.token()
    clock.advance(1499)
    assert signer.token() == first
    clock.advance(1)
    second = signer.token()
    assert second != first and signer.renewals == 2


def test_jwt_renew_after_expired_happens_once_for_concurrent_pushes(tmp_path: Path) -> None:
    write_p8(tmp_path / "k.p8")
    clock = FakeClock()
    signer = JwtSigner(load_p8_key(tmp_path / "k.p8"), "K", "T", clock)
    stale = signer.token()
    clock.advance(1)
    fresh = signer.renew(stale)
    assert fresh != stale
    assert signer.renew(stale) == fresh  # a second 403 for the old token reuses the new one
    assert signer.renewals == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "cannot read APNs key"),
        (lambda p: p.write_text("hello"), "not a PEM private key"),
        (write_rsa, "not an EC P-256 key"),
    ],
)
def test_bad_key_file_named(tmp_path: Path, make: object, message: str) -> None:
    path = tmp_path / "AuthKey_X.p8"
    make(path)  # type: ignore[operator]
    with pytest.raises(ApnsConfigError) as info:
        ApnsProvider(ApnsSettings(key_file=str(path), key_id="K", team_id="T"))
    assert str(path) in str(info.value) and message in str(info.value)
    assert info.value.field == "key_file"
    assert "PRIVATE KEY" not in str(info.value)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"key_file": "k.p8", "team_id": "T"}, "key_id"),
        ({"key_file": "k.p8", "key_id": "K"}, "team_id"),
        ({"key_id": "K", "team_id": "T"}, "key_file"),
        ({"jwt_max_age": 600.0}, "jwt_max_age"),
        ({"jwt_max_age": 7200.0}, "jwt_max_age"),
        ({"server": "api.push.apple.com"}, "server"),
        ({"dev_server": "https://x/path"}, "dev_server"),
    ],
)
def test_settings_checked(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ApnsConfigError) as info:
        ApnsProvider(ApnsSettings(**settings))  # type: ignore[arg-type]
    assert info.value.field == field


# --- certificates --------------------------------------------------------------------------


def test_cert_dir_follows_flexisip_naming(tmp_path: Path) -> None:
    for name in (
        "org.example.app.prod.pem",
        "org.example.app.dev.pem",
        "org.example.app.voip.prod.pem",
        "org.other.voip.dev.pem",
    ):
        write_cert_pem(tmp_path / name)
    (tmp_path / "README.txt").write_text("not a certificate")
    write_cert_pem(tmp_path / "stray.pem")  # not <bundle>.{prod,dev}.pem: ignored
    index = cert_dir_index(tmp_path)
    assert set(index) == {
        ("org.example.app", False),
        ("org.example.app", True),
        ("org.example.app.voip", False),
        ("org.other.voip", True),
    }
    provider = ApnsProvider(ApnsSettings(certificate_dir=str(tmp_path)))
    dev = Provider.APNS_DEV
    assert provider.accepts(REMOTE)
    assert provider.accepts(VOIP)
    assert provider.accepts(Destination(dev, "org.example.app", TOKEN))
    # no org.example.app.voip.dev.pem: the app's own (universal) certificate serves .voip
    assert provider.accepts(Destination(dev, "org.example.app", TOKEN, Service.VOIP))
    assert provider.accepts(Destination(dev, "org.other", TOKEN, Service.VOIP))
    assert not provider.accepts(Destination(Provider.APNS, "org.other", TOKEN, Service.VOIP))
    assert not provider.accepts(Destination(Provider.FCM, "org.example.app", TOKEN))


def test_bad_certificate_named(tmp_path: Path) -> None:
    (tmp_path / "org.example.app.prod.pem").write_text("-----BEGIN CERTIFICATE-----\nxx\n")
    with pytest.raises(ApnsConfigError, match=r"org\.example\.app\.prod\.pem: not a PEM cert"):
        ApnsProvider(ApnsSettings(certificate_dir=str(tmp_path)))
    with pytest.raises(ApnsConfigError, match=r"nope\.pem: no such file"):
        ApnsProvider(ApnsSettings(cert_file=str(tmp_path / "nope.pem")))
    with pytest.raises(ApnsConfigError, match="not a directory"):
        ApnsProvider(ApnsSettings(certificate_dir=str(tmp_path / "missing")))


def test_one_cert_file_serves_every_topic(tmp_path: Path) -> None:
    pem = write_cert_pem(tmp_path / "all.pem")
    provider = ApnsProvider(ApnsSettings(cert_file=str(pem)))
    assert provider.accepts(VOIP) and provider.accepts(REMOTE)
    assert provider.accepts(Destination(Provider.APNS_DEV, "any.bundle", TOKEN))


def test_no_credentials_accepts_nothing_and_disabled_too(tmp_path: Path) -> None:
    assert not ApnsProvider(ApnsSettings()).accepts(REMOTE)
    write_p8(tmp_path / "k.p8")
    settings = ApnsSettings(enabled=False, key_file=str(tmp_path / "k.p8"), key_id="K", team_id="T")
    assert not ApnsProvider(settings).accepts(REMOTE)


@pytest.mark.parametrize("token", [".", "..", "ab_cd", "ab-cd", "xyz0"])
def test_non_hexadecimal_token_refused(token: str) -> None:
    dest = Destination(Provider.APNS, "org.example.app", token)
    with pytest.raises(PushError, match="invalid APNs device token"):
        build_message(req(PushKind.MESSAGE, dest), FakeClock())


def test_upper_case_hex_token_accepted() -> None:
    dest = Destination(Provider.APNS, "org.example.app", TOKEN.upper())
    assert build_message(req(PushKind.MESSAGE, dest), FakeClock()).path.endswith(TOKEN.upper())


@pytest.mark.parametrize(
    "kind", [PushKind.MESSAGE, PushKind.BACKGROUND, PushKind.RINGING, PushKind.CALL_ENDED]
)
@pytest.mark.parametrize(
    "dest",
    [VOIP, Destination(Provider.APNS, "org.example.app.voip", TOKEN)],
    ids=["voip-token", "voip-bundle"],
)
def test_only_calls_go_to_pushkit(kind: PushKind, dest: Destination) -> None:
    # Apple would answer DeviceTokenNotForTopic, and the valid token would be dropped.
    with pytest.raises(PushError, match=f"refused: a {kind.value} push to the VoIP"):
        build_message(req(kind, dest), FakeClock())


def test_message_text_is_the_alert_body_and_thread_id_groups_the_chat() -> None:
    msg = build_message(
        req(PushKind.MESSAGE, text="Lunch at noon?", thread_id="sip:room@x"), FakeClock()
    )
    aps = decoded(msg.body)["aps"]
    assert aps == {
        "alert": {"loc-key": "IM_MSG", "loc-args": ["Alice"], "body": "Lunch at noon?"},
        "sound": "default",
        "badge": 1,
        "thread-id": "sip:room@x",
    }


def test_message_without_text_keeps_the_linphone_alert() -> None:
    aps = decoded(build_message(req(PushKind.MESSAGE), FakeClock()).body)["aps"]
    assert isinstance(aps, dict)
    assert aps["alert"] == {"loc-key": "IM_MSG", "loc-args": ["Alice"]}
    assert "thread-id" not in aps


def test_call_to_a_remote_notification_token_refused() -> None:
    # It would go to the .voip topic with a token of the bundle's: DeviceTokenNotForTopic.
    with pytest.raises(PushError, match=r"refused: a call push \(PushKit\) to the remote"):
        build_message(req(PushKind.CALL, REMOTE), FakeClock())
