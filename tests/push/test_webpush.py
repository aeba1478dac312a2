"""Web Push provider (VAPID, RFC 8291 payloads) against the Web Push simulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.push import ece
from sipwake.push.providers.webpush import VapidKey, WebPushProvider, audience_of, keys_from_b64
from sipwake.push.request import Destination, Outcome, Provider, PushError, PushKind, PushRequest
from sipwake.simulator.webpush import Subscription, WebPushSimulator, write_vapid_key
from tests.push.fcm_helpers import FakeSleep


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[WebPushSimulator]:
    simulator = await WebPushSimulator(clock=clock).start()
    yield simulator
    await simulator.aclose()


@pytest.fixture
def vapid_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "vapid.pem"
    return path, write_vapid_key(path)


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


@pytest.fixture
async def provider(
    vapid_file: tuple[Path, str], clock: FakeClock, sleep: FakeSleep
) -> AsyncIterator[WebPushProvider]:
    vapid = VapidKey.load(vapid_file[0], "mailto:ops@example.org")
    p = WebPushProvider(vapid, clock=clock, sleep=sleep, rng=lambda: 1.0)
    yield p
    await p.aclose()


def push(sub: Subscription, kind: PushKind = PushKind.CALL, ttl: int = 30) -> PushRequest:
    return PushRequest(
        destination=Destination(Provider.WEBPUSH, "", sub.endpoint),
        kind=kind,
        call_id="c-42@example.org",
        from_uri="sip:bob@example.org",
        display_name="Bob",
        display_from_uri=True,
        text="hi",
        ttl=ttl,
    )


async def test_call_push_without_payload(
    provider: WebPushProvider, sim: WebPushSimulator, vapid_file: tuple[Path, str]
) -> None:
    sub = sim.subscribe(application_server_key=vapid_file[1])
    result = await provider.send(push(sub, ttl=60))
    assert result.outcome is Outcome.SENT and result.status == 201
    assert result.provider_id.startswith(f"{sim.url}/message/")
    [got] = sim.received
    assert got.payload is None and got.body == b""
    assert got.ttl == 60
    assert got.urgency == "high"
    assert got.vapid_subject == "mailto:ops@example.org"
    assert provider.vapid.public_key_b64 == vapid_file[1]


async def test_message_push_is_normal_urgency_with_topic(
    provider: WebPushProvider, sim: WebPushSimulator
) -> None:
    sub = sim.subscribe()
    request = push(sub, PushKind.MESSAGE)
    request.collapse_id = "chat-room-1"
    assert (await provider.send(request)).ok
    request.collapse_id = "not a valid topic!"
    assert (await provider.send(request)).ok
    assert sim.received[0].urgency == "normal"
    assert [r.topic for r in sim.received] == ["chat-room-1", None]


async def test_encrypted_payload_decrypts_with_the_subscription_key(
    provider: WebPushProvider, sim: WebPushSimulator
) -> None:
    sub = sim.subscribe()
    browser = sub.to_json()["keys"]
    assert isinstance(browser, dict)
    provider.set_subscription_keys(sub.endpoint, keys_from_b64(browser["p256dh"], browser["auth"]))
    assert (await provider.send(push(sub))).ok
    [got] = sim.received
    # Decrypt here, with the browser's private key, not through the simulator.
    plain = ece.decrypt(got.body, sub.private_key, sub.auth)
    assert plain == got.payload
    data = json.loads(plain)
    assert data["type"] == "call"
    assert data["call-id"] == "c-42@example.org"
    assert data["from-uri"] == "sip:bob@example.org"
    assert data["loc-key"] == "IC_MSG"
    http_ece = pytest.importorskip("http_ece")
    assert (
        http_ece.decrypt(
            got.body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm"
        )
        == plain
    )
    provider.set_subscription_keys(sub.endpoint, None)
    assert (await provider.send(push(sub))).ok
    assert sim.received[1].payload is None


async def test_expired_and_unknown_subscriptions_are_rejected(
    provider: WebPushProvider, sim: WebPushSimulator
) -> None:
    sub = sim.subscribe()
    sim.unsubscribe(sub)
    gone = await provider.send(push(sub))
    assert gone.outcome is Outcome.TOKEN_REJECTED and gone.status == 410
    sub.endpoint = f"{sim.url}/push/nosuchsubscription"
    missing = await provider.send(push(sub))
    assert missing.outcome is Outcome.TOKEN_REJECTED and missing.status == 404


async def test_push_with_another_vapid_key_is_refused(
    provider: WebPushProvider, sim: WebPushSimulator, tmp_path: Path
) -> None:
    other_key = write_vapid_key(tmp_path / "other.pem")
    sub = sim.subscribe(application_server_key=other_key)
    result = await provider.send(push(sub))
    assert result.outcome is Outcome.FAILED and result.status == 403
    assert "applicationServerKey" in result.reason
    assert sim.received == []


async def test_throttling_is_retried_with_backoff(
    provider: WebPushProvider, sim: WebPushSimulator, sleep: FakeSleep
) -> None:
    sub = sim.subscribe()
    sim.fail_next = [429, 503]
    assert (await provider.send(push(sub))).ok
    assert sleep.delays == [0.5, 1.0]


async def test_bad_endpoint_and_bad_keys_fail_precisely(provider: WebPushProvider) -> None:
    request = PushRequest(Destination(Provider.WEBPUSH, "", "not-a-uri"), PushKind.CALL)
    result = await provider.send(request)
    assert result.outcome is Outcome.FAILED
    assert "push subscription URI" in result.reason
    with pytest.raises(PushError, match="bad subscription keys"):
        keys_from_b64("AAAA", "AAAA")


def test_vapid_configuration_errors(tmp_path: Path, vapid_file: tuple[Path, str]) -> None:
    with pytest.raises(PushError, match="mailto: or https:"):
        VapidKey.load(vapid_file[0], "ops@example.org")
    with pytest.raises(PushError, match="cannot read"):
        VapidKey.load(tmp_path / "missing.pem", "mailto:a@b")
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nsecret\n-----END PRIVATE KEY-----\n")
    with pytest.raises(PushError, match="not an unencrypted PEM") as info:
        VapidKey.load(junk, "mailto:a@b")
    assert "secret" not in str(info.value)


def test_vapid_audience_is_the_origin() -> None:
    assert audience_of("https://push.example.net/wpush/v2/abc") == "https://push.example.net"
    assert audience_of("https://push.example.net:8443/x") == "https://push.example.net:8443"
    assert audience_of("http://127.0.0.1:8080/push/1") == "http://127.0.0.1:8080"


async def test_message_text_travels_in_the_encrypted_payload(
    provider: WebPushProvider, sim: WebPushSimulator
) -> None:
    sub = sim.subscribe()
    provider.set_subscription_keys(sub.endpoint, sub.keys)
    assert (await provider.send(push(sub, PushKind.MESSAGE))).ok
    [got] = sim.received
    data = json.loads(ece.decrypt(got.body, sub.private_key, sub.auth))
    assert data["type"] == "message"
    assert data["text"] == "hi"
