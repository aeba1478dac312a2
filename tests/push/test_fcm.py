"""FCM HTTP v1 and legacy providers against the FCM simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.push.providers.fcm import FcmLegacyProvider, FcmV1Provider, load_service_accounts
from sipwake.push.providers.fcm_auth import ServiceAccount
from sipwake.push.providers.transport import Backoff, Http1Transport
from sipwake.push.request import Destination, Outcome, Provider, PushError, PushKind
from sipwake.simulator.fcm import FcmSimulator
from tests.push.fcm_helpers import FakeSleep, fcm_request

PROJECT = "sipwake-test"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[FcmSimulator]:
    simulator = await FcmSimulator(clock=clock).start()
    yield simulator
    await simulator.aclose()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


@pytest.fixture
async def v1(
    sim: FcmSimulator, clock: FakeClock, sleep: FakeSleep, tmp_path: Path
) -> AsyncIterator[FcmV1Provider]:
    path = tmp_path / "sa.json"
    sim.create_service_account(PROJECT, path)
    accounts = load_service_accounts({PROJECT: str(path), "123456789": str(path)})
    provider = FcmV1Provider(
        accounts,
        server=sim.url,
        transport=Http1Transport(),
        clock=clock,
        sleep=sleep,
        rng=lambda: 1.0,
    )
    yield provider
    await provider.aclose()


async def test_call_push_is_the_flexisip_data_message(v1: FcmV1Provider, sim: FcmSimulator) -> None:
    result = await v1.send(fcm_request(custom_payload={"room": "r1"}, ttl=45))
    assert result.outcome is Outcome.SENT
    assert result.provider_id.startswith(f"projects/{PROJECT}/messages/")
    [message] = sim.messages
    assert message["token"] == "fcm-token-0001"
    android = message["android"]
    assert android["priority"] == "high"
    assert android["ttl"] == "45s"
    data = android["data"]
    assert all(isinstance(v, str) for v in data.values())
    assert data["call-id"] == "call-1@example.org"
    assert data["from-uri"] == "sip:alice@example.org"
    assert data["display-name"] == data["sip-from"] == data["loc-args"] == "Alice"
    assert data["loc-key"] == "IC_MSG"
    assert json.loads(data["custom-payload"]) == {"room": "r1"}
    assert data["send-time"] == "2026-01-01 00:00:00"
    assert set(data) == {"uuid", "from-uri", "display-name", "call-id", "sip-from", "loc-key",
                         "loc-args", "send-time", "custom-payload"}  # fmt: skip
    assert "notification" not in message


async def test_ttl_is_capped_at_four_weeks(v1: FcmV1Provider, sim: FcmSimulator) -> None:
    assert (await v1.send(fcm_request(ttl=10**9))).ok
    assert sim.messages[0]["android"]["ttl"] == "2419200s"


async def test_message_push_uses_message_key_and_falls_back_to_uri(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    assert (await v1.send(fcm_request(kind=PushKind.MESSAGE, display_name=""))).ok
    data = sim.messages[0]["android"]["data"]
    assert data["loc-key"] == "IM_MSG"
    assert data["sip-from"] == "sip:alice@example.org"


async def test_caller_hidden_without_display_from_uri(v1: FcmV1Provider, sim: FcmSimulator) -> None:
    assert (await v1.send(fcm_request(display_from_uri=False))).ok
    data = sim.messages[0]["android"]["data"]
    assert data["from-uri"] == data["display-name"] == data["sip-from"] == data["loc-args"] == ""
    assert data["call-id"] == "call-1@example.org"  # the app still matches the call


async def test_project_number_and_id_share_one_access_token(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    assert v1.accepts(Destination(Provider.FCM, "123456789", "t"))
    results = await asyncio.gather(
        *(
            v1.send(fcm_request(project=p, token=f"tok-{i}"))
            for i, p in enumerate([PROJECT, "123456789"] * 5)
        )
    )
    assert all(r.ok for r in results)
    assert sim.token_requests == 1
    assert {m["project"] for m in sim.messages} == {PROJECT}


async def test_unknown_project_is_refused_with_reason(v1: FcmV1Provider) -> None:
    assert not v1.accepts(Destination(Provider.FCM, "other-project", "t"))
    result = await v1.send(fcm_request(project="other-project"))
    assert result.outcome is Outcome.FAILED
    assert "other-project" in result.reason


async def test_token_refreshed_ahead_of_expiry(
    v1: FcmV1Provider, sim: FcmSimulator, clock: FakeClock
) -> None:
    assert (await v1.send(fcm_request())).ok
    clock.advance(3600 - 300 - 1)  # just before the anticipation window
    assert (await v1.send(fcm_request())).ok
    assert sim.token_requests == 1
    clock.advance(2)  # inside it: refreshed although the old token is still valid
    assert (await v1.send(fcm_request())).ok
    await v1.manager(PROJECT).wait_refreshed()  # in the background
    assert sim.token_requests == 2
    assert v1.manager(PROJECT).refreshes == 2


async def test_failed_refresh_waits_the_retry_interval_then_recovers(
    v1: FcmV1Provider, sim: FcmSimulator, clock: FakeClock
) -> None:
    sim.token_failures = 1
    first = await v1.send(fcm_request())
    assert first.outcome is Outcome.FAILED
    assert "no FCM access token" in first.reason and "500" in first.reason
    clock.advance(59)
    again = await v1.send(fcm_request())
    assert again.outcome is Outcome.FAILED
    assert sim.token_requests == 1  # no attempt before default-refresh-interval
    clock.advance(1)
    assert (await v1.send(fcm_request())).ok
    assert sim.token_requests == 2
    assert len(sim.messages) == 1


async def test_failed_refresh_keeps_using_a_still_valid_token(
    v1: FcmV1Provider, sim: FcmSimulator, clock: FakeClock
) -> None:
    assert (await v1.send(fcm_request())).ok
    clock.advance(3400)  # inside the anticipation window, token valid 200 s more
    sim.token_failures = 1
    assert (await v1.send(fcm_request())).ok
    await v1.manager(PROJECT).wait_refreshed()
    assert sim.token_requests == 2
    assert (await v1.send(fcm_request())).ok
    assert sim.token_requests == 2  # waiting for the retry interval
    clock.advance(60)
    assert (await v1.send(fcm_request())).ok
    await v1.manager(PROJECT).wait_refreshed()
    assert sim.token_requests == 3


async def test_unregistered_token_is_rejected(v1: FcmV1Provider, sim: FcmSimulator) -> None:
    sim.unregistered.add("dead-token")
    result = await v1.send(fcm_request(token="dead-token"))
    assert result.outcome is Outcome.TOKEN_REJECTED
    assert result.status == 404
    assert "UNREGISTERED" in result.reason


async def test_invalid_argument_fails_with_googles_message(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    sim.invalid_registration.add("garbage")
    result = await v1.send(fcm_request(token="garbage"))
    assert result.outcome is Outcome.FAILED
    assert result.status == 400
    assert "not a valid FCM registration token" in result.reason


async def test_401_refreshes_the_access_token_and_retries_once(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    assert (await v1.send(fcm_request())).ok
    sim.revoke_access_tokens()
    assert (await v1.send(fcm_request())).ok
    assert sim.token_requests == 2
    assert len(sim.messages) == 2


async def test_repeated_401_fails_after_one_retry(v1: FcmV1Provider, sim: FcmSimulator) -> None:
    assert (await v1.send(fcm_request())).ok
    sim.inject(401, count=3)
    result = await v1.send(fcm_request())
    assert result.outcome is Outcome.FAILED
    assert result.status == 401
    assert sim.token_requests == 2  # one forced refresh, not a loop
    assert len(sim.injected) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_transient_errors_back_off_then_succeed(
    v1: FcmV1Provider, sim: FcmSimulator, sleep: FakeSleep, status: int
) -> None:
    sim.inject(status, count=2)
    result = await v1.send(fcm_request())
    assert result.ok
    assert sleep.delays == [0.5, 1.0]  # exponential (jitter pinned to its top)
    assert len(sim.messages) == 1


async def test_backoff_has_jitter_and_is_bounded(
    sim: FcmSimulator, clock: FakeClock, sleep: FakeSleep, tmp_path: Path
) -> None:
    path = tmp_path / "sa.json"
    sim.create_service_account(PROJECT, path)
    provider = FcmV1Provider(
        {PROJECT: ServiceAccount.load(path)},
        server=sim.url,
        transport=Http1Transport(),
        clock=clock,
        sleep=sleep,
        rng=lambda: 0.0,
        backoff=Backoff(attempts=3, base=2.0, cap=30.0),
    )
    sim.inject(503, count=5)
    result = await provider.send(fcm_request())
    await provider.aclose()
    assert result.outcome is Outcome.FAILED
    assert result.status == 503 and "UNAVAILABLE" in result.reason
    assert sleep.delays == [1.0, 2.0]  # half of 2 s and 4 s: jitter at its bottom
    assert len(sim.injected) == 2  # three attempts made, no more


async def test_retry_after_is_honoured(
    v1: FcmV1Provider, sim: FcmSimulator, sleep: FakeSleep
) -> None:
    sim.inject(429, retry_after="7")
    assert (await v1.send(fcm_request())).ok
    assert sleep.delays == [7.0]


async def test_retry_after_beyond_the_cap_gives_up(
    v1: FcmV1Provider, sim: FcmSimulator, sleep: FakeSleep
) -> None:
    sim.inject(503, retry_after="3600")
    result = await v1.send(fcm_request())
    assert result.outcome is Outcome.FAILED and result.status == 503
    assert sleep.delays == []


async def test_unreachable_server_fails_with_reason(
    clock: FakeClock, sleep: FakeSleep, tmp_path: Path, sim: FcmSimulator
) -> None:
    from tests.conftest import free_port

    path = tmp_path / "sa.json"
    sim.create_service_account(PROJECT, path)
    provider = FcmV1Provider(
        {PROJECT: ServiceAccount.load(path)},
        server=f"http://127.0.0.1:{free_port()}",
        transport=Http1Transport(),
        clock=clock,
        sleep=sleep,
    )
    result = await provider.send(fcm_request())
    await provider.aclose()
    assert result.outcome is Outcome.FAILED
    assert "connection" in result.reason
    assert len(sleep.delays) == 3


def test_service_account_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "service_account", "project_id": "p"}))
    with pytest.raises(PushError, match=r"service-accounts\.p: .*bad\.json: missing or empty"):
        load_service_accounts({"p": str(bad)})
    bad.write_text("{not json")
    with pytest.raises(PushError, match="not JSON"):
        ServiceAccount.load(bad)
    with pytest.raises(PushError, match="cannot read"):
        ServiceAccount.load(tmp_path / "missing.json")
    bad.write_text(json.dumps({"project_id": "p", "client_email": "e", "token_uri": "u",
                               "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n"}))  # fmt: skip
    with pytest.raises(PushError, match="private_key is not") as info:
        ServiceAccount.load(bad)
    assert "AAAA" not in str(info.value)


# -- legacy API ---------------------------------------------------------------------------


@pytest.fixture
async def legacy(
    sim: FcmSimulator, clock: FakeClock, sleep: FakeSleep
) -> AsyncIterator[tuple[FcmLegacyProvider, str]]:
    key = sim.add_legacy_key("123456789")
    provider = FcmLegacyProvider(
        {"123456789": key},
        server=sim.url,
        transport=Http1Transport(),
        clock=clock,
        sleep=sleep,
        rng=lambda: 1.0,
    )
    yield provider, key
    await provider.aclose()


async def test_legacy_push_shape(legacy: tuple[FcmLegacyProvider, str], sim: FcmSimulator) -> None:
    provider, _ = legacy
    result = await provider.send(fcm_request(project="123456789", ttl=90))
    assert result.ok and result.provider_id.startswith("0:")
    [body] = sim.legacy_messages
    assert body["to"] == "fcm-token-0001"
    assert body["priority"] == "high"
    assert body["time_to_live"] == 90
    assert body["data"]["call-id"] == "call-1@example.org"
    assert body["project"] == "123456789"


@pytest.mark.parametrize("kind", ["unregistered", "invalid_registration"])
async def test_legacy_dead_tokens_are_rejected(
    legacy: tuple[FcmLegacyProvider, str], sim: FcmSimulator, kind: str
) -> None:
    getattr(sim, kind).add("dead")
    result = await legacy[0].send(fcm_request(project="123456789", token="dead"))
    assert result.outcome is Outcome.TOKEN_REJECTED
    assert result.reason in ("NotRegistered", "InvalidRegistration")


async def test_legacy_wrong_key_fails(sim: FcmSimulator, clock: FakeClock) -> None:
    provider = FcmLegacyProvider(
        {"123456789": "AAAAwrong"}, server=sim.url, transport=Http1Transport(), clock=clock
    )
    result = await provider.send(fcm_request(project="123456789"))
    await provider.aclose()
    assert result.outcome is Outcome.FAILED and result.status == 401


async def test_legacy_retries_unavailable(
    legacy: tuple[FcmLegacyProvider, str], sim: FcmSimulator, sleep: FakeSleep
) -> None:
    sim.inject(503, retry_after="2")
    assert (await legacy[0].send(fcm_request(project="123456789"))).ok
    assert sleep.delays == [2.0]


async def test_v1_over_http2_and_tls(clock: FakeClock, tmp_path: Path) -> None:
    """The production path: TLS with the simulator CA, HTTP/2 for pushes, one connection."""
    from sipwake.push.providers.transport import Http2Transport, ssl_context
    from sipwake.simulator.tls import Pki

    pki = Pki(tmp_path / "pki", clock=clock)
    pki.ensure()
    simulator = await FcmSimulator(clock=clock).start(pki=pki, http2=True)
    try:
        path = tmp_path / "sa.json"
        simulator.create_service_account(PROJECT, path)
        ca = str(pki.ca_file)
        provider = FcmV1Provider(
            {PROJECT: ServiceAccount.load(path)},
            server=simulator.h2_url,
            transport=Http2Transport(ssl_context=ssl_context(ca)),
            token_transport=Http1Transport(ssl_context=ssl_context(ca)),
            clock=clock,
        )
        assert simulator.token_uri.startswith("https://")
        results = await asyncio.gather(
            *(provider.send(fcm_request(token=f"t{i}")) for i in range(20))
        )
        await provider.aclose()
        assert all(r.ok for r in results)
        assert simulator.http_versions == {"1.1", "2"}  # token over 1.1, pushes over h2
        assert simulator.h2_server is not None and simulator.h2_server.accepted == 1
        assert len(simulator.messages) == 20
    finally:
        await simulator.aclose()


def test_retry_after_forms_and_backoff_bounds() -> None:
    from sipwake.push.providers.transport import retry_after

    now = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
    assert retry_after({"retry-after": "12"}, now) == 12.0
    assert retry_after({"retry-after": "Thu, 01 Jan 2026 00:00:30 GMT"}, now) == 30.0
    assert retry_after({"retry-after": "Wed, 31 Dec 2025 00:00:00 GMT"}, now) == 0.0
    assert retry_after({"retry-after": "soon"}, now) is None
    assert retry_after({}, now) is None
    backoff = Backoff(attempts=10, base=1.0, cap=8.0)
    tops = [backoff.delay(n, 1.0, None) for n in range(1, 10)]
    assert tops == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]  # exponential, then capped
    assert backoff.delay(10, 1.0, None) is None  # attempts spent
    assert backoff.delay(3, 0.0, None) == 2.0  # jitter never goes below half


async def test_short_lived_tokens_are_not_refreshed_at_every_push(
    v1: FcmV1Provider, sim: FcmSimulator, clock: FakeClock
) -> None:
    sim.token_lifetime = 200  # shorter than the 300 s anticipation
    assert (await v1.send(fcm_request())).ok
    assert (await v1.send(fcm_request())).ok
    assert sim.token_requests == 1
    clock.advance(101)  # past half its life: refreshed
    assert (await v1.send(fcm_request())).ok
    await v1.manager(PROJECT).wait_refreshed()
    assert sim.token_requests == 2


def test_retry_after_date_without_zone_is_gmt(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from sipwake.push.providers.transport import retry_after

    monkeypatch.setenv("TZ", "America/New_York")  # a local time far from GMT
    time.tzset()
    try:
        now = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
        # "-0000" (RFC 5322: zone unknown) parses without a zone; HTTP dates are GMT.
        assert retry_after({"retry-after": "Thu, 01 Jan 2026 00:00:30 -0000"}, now) == 30.0
        assert retry_after({"retry-after": "²"}, now) is None  # a digit, but not ASCII
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


async def test_message_text_travels_in_the_text_data_key(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    assert (await v1.send(fcm_request(kind=PushKind.MESSAGE, text="Maintenance at 22:00"))).ok
    assert (await v1.send(fcm_request(kind=PushKind.CALL))).ok
    first, second = (m["android"]["data"] for m in sim.messages)
    assert first["text"] == "Maintenance at 22:00"
    assert "text" not in second  # no text, no key


async def test_only_calls_and_messages_are_high_priority(
    v1: FcmV1Provider, sim: FcmSimulator
) -> None:
    kinds = [PushKind.CALL, PushKind.MESSAGE, PushKind.BACKGROUND, PushKind.CALL_ENDED]
    for kind in kinds:
        assert (await v1.send(fcm_request(kind=kind))).ok
    priorities = [m["android"]["priority"] for m in sim.messages]
    assert priorities == ["high", "high", "normal", "normal"]


def test_legacy_priority_follows_the_kind() -> None:
    from sipwake.push.providers.fcm import legacy_message

    assert legacy_message(fcm_request(kind=PushKind.BACKGROUND), 0)["priority"] == "normal"
    assert legacy_message(fcm_request(kind=PushKind.CALL), 0)["priority"] == "high"


async def test_third_party_auth_error_fails_without_refreshing_the_token(
    v1: FcmV1Provider, sim: FcmSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sipwake.simulator import fcm as fcm_sim

    assert (await v1.send(fcm_request())).ok
    # The Firebase project's APNs/Web Push credential is wrong: FCM answers 401 with
    # errorCode THIRD_PARTY_AUTH_ERROR although the access token is good.
    monkeypatch.setitem(fcm_sim._STATUS_NAMES, 401, "THIRD_PARTY_AUTH_ERROR")
    sim.inject(401, count=2)
    result = await v1.send(fcm_request())
    assert result.outcome is Outcome.FAILED and result.status == 401
    assert result.reason.startswith("THIRD_PARTY_AUTH_ERROR: ")
    assert sim.token_requests == 1  # the access token was not thrown away
    assert len(sim.injected) == 1  # one attempt only
