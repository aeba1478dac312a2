"""API keys, rate limits, body size, /metrics and /health of the running server."""

from __future__ import annotations

import re

import pytest

from sipwake.api.app import ApiContext
from sipwake.api.auth import RateLimiter, check_key
from sipwake.clock import FakeClock
from sipwake.simulator.apns import ApnsSimulator

from .conftest import APP, DEAD, TOKEN, Api, StartApi

BATCH = {"notifications": [{"app_id": APP, "token": TOKEN, "type": "message"}]}
TEXT = {"verb": "NotifyTextMessage", "AppId": APP, "DeviceToken": TOKEN, "Selector": "s"}


def context(api: Api) -> ApiContext:
    assert api.server.api is not None
    return api.server.api.context


async def test_api_keys_guard_v1_and_not_pnm2_by_default(start_api: StartApi) -> None:
    api = await start_api(http={"api-keys": ["s3cret-key", "other-key"]})
    status, data, headers = await api.post("/v1/push", BATCH)
    assert status == 401
    assert headers["WWW-Authenticate"] == "Bearer"
    assert "missing Authorization" in data["errors"][0]["detail"]
    status, data, _ = await api.post("/v1/push", BATCH, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "invalid API key" in data["errors"][0]["detail"]
    status, data, _ = await api.post(
        "/v1/push", BATCH, headers={"Authorization": "Basic s3cret-key"}
    )
    assert status == 401
    status, data, _ = await api.post(
        "/v1/push", BATCH, headers={"Authorization": "Bearer other-key"}
    )
    assert status == 200 and data["results"][0]["status"] == "sent"
    status, _, _ = await api.request("GET", "/v1/push-credentials")
    assert status == 401
    status, data, _ = await api.post("/pnm2/send", TEXT)
    assert (status, data["code"]) == (200, 200)
    status, _, _ = await api.request("GET", "/health")
    assert status == 200


async def test_pnm2_auth_uses_the_acrobits_error_shape(start_api: StartApi) -> None:
    api = await start_api(http={"api-keys": ["k"], "pnm2-auth": True})
    status, data, _ = await api.post("/pnm2/send", TEXT)
    assert status == 401
    assert data["code"] == 401 and "Authorization" in data["response"]
    status, data, _ = await api.post("/pnm2/send", TEXT, headers={"Authorization": "Bearer k"})
    assert (status, data["code"]) == (200, 200)


def test_key_check_finds_only_an_exact_key() -> None:
    keys = ["alpha", "beta"]
    assert check_key("beta", keys) == "beta"
    assert check_key("bet", keys) is None
    assert check_key("betaa", keys) is None
    assert check_key("", keys) is None


def test_rate_limiter_refills_with_the_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0  # another key has its own bucket
    clock.advance(0.5)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.advance(10)
    assert [limiter.take("a") for _ in range(4)][-1] > 0  # refilled only up to the burst
    assert limiter.limited == 3


def test_rate_limiter_table_is_bounded_and_keeps_active_clients() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock, capacity=100)
    assert [limiter.take("busy") for _ in range(2)] == [0.0, 0.0]
    for i in range(1000):  # many clients, none of them idle long enough to refill
        assert limiter.take(f"10.0.{i // 256}.{i % 256}") == 0.0
        assert limiter.take("busy") > 0  # still limited: its bucket was not forgotten
    assert len(limiter) == 100
    clock.advance(10)  # every bucket refilled: each new client drops up to two of them
    for i in range(50):
        limiter.take(f"10.9.0.{i}")
    assert len(limiter) == 50


async def test_rate_limit_answers_429_with_retry_after(start_api: StartApi) -> None:
    api = await start_api(http={"api-keys": ["k1", "k2"], "rate-limit": 2, "rate-limit-burst": 2})
    clock = FakeClock()
    context(api).limiter.clock = clock
    auth = {"Authorization": "Bearer k1"}
    assert (await api.post("/v1/push", BATCH, headers=auth))[0] == 200
    assert (await api.post("/v1/push", BATCH, headers=auth))[0] == 200
    status, data, headers = await api.post("/v1/push", BATCH, headers=auth)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert "rate limit" in data["errors"][0]["detail"]
    assert (await api.post("/v1/push", BATCH, headers={"Authorization": "Bearer k2"}))[0] == 200
    status, data, _ = await api.post("/pnm2/send", TEXT)
    assert status == 200  # /pnm2 without keys: limited per client address, bucket still full
    clock.advance(0.5)
    assert (await api.post("/v1/push", BATCH, headers=auth))[0] == 200
    status, body, _ = await api.request("GET", "/metrics")
    assert "sipwake_http_rate_limited_total 1" in body


async def test_body_size_limit_is_413_json(start_api: StartApi) -> None:
    api = await start_api(http={"max-body-size": 2048})
    big = {
        "notifications": [{"app_id": APP, "token": TOKEN, "type": "message", "text": "x" * 4096}]
    }
    status, data, _ = await api.post("/v1/push", big)
    assert status == 413
    assert "2048 bytes" in data["errors"][0]["detail"]
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "Message": "x" * 4096})
    assert status == 413 and data["code"] == 413


async def test_unknown_paths_and_methods_are_json(api: Api) -> None:
    status, data, _ = await api.request("GET", "/v2/nothing")
    assert status == 404 and data["errors"][0]["code"] == "404"
    status, data, headers = await api.request("PUT", "/v1/push")
    assert status == 405 and "POST" in headers["Allow"]


SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+-]+(Inf)?$')


async def test_metrics_report_pushes_latency_queue_and_rejections(
    api: Api, sim: ApnsSimulator
) -> None:
    await api.post("/pnm2/send", TEXT)
    await api.post("/pnm2/send", TEXT)
    await api.post("/pnm2/send", {**TEXT, "DeviceToken": DEAD})
    await api.post("/v1/push", {"notifications": [{"app_id": APP, "token": TOKEN, "type": "call"}]})
    status, text, headers = await api.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = text.splitlines()
    for line in lines:
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert 'sipwake_pushes_total{provider="apns",kind="message",result="sent"} 2' in lines
    assert 'sipwake_pushes_total{provider="apns",kind="message",result="token-rejected"} 1' in lines
    assert 'sipwake_pushes_total{provider="apns",kind="ringing",result="sent"} 1' in lines
    assert 'sipwake_push_latency_seconds_bucket{provider="apns",le="+Inf"} 4' in lines
    assert 'sipwake_push_latency_seconds_count{provider="apns"} 4' in lines
    assert 'sipwake_push_queue_depth{provider="apns"} 0' in lines
    assert 'sipwake_push_rejected_tokens_total{provider="apns"} 1' in lines
    assert "# TYPE sipwake_push_latency_seconds histogram" in lines
    assert 'sipwake_http_requests_total{route="/pnm2/send",status="200"} 3' in lines


async def test_metrics_include_sip_counters_when_given(api: Api) -> None:
    context(api).sip_counters = lambda: {"requests_total": 7, "transactions": 2}
    status, text, _ = await api.request("GET", "/metrics")
    assert status == 200
    assert "sipwake_sip_requests_total 7" in text.splitlines()
    assert "# TYPE sipwake_sip_transactions gauge" in text


async def test_metrics_show_the_registrar_counters_when_sip_runs(start_api: StartApi) -> None:
    import socket

    from tests.conftest import free_port

    port = free_port(socket.SOCK_DGRAM)
    api = await start_api(sip={"listen": [f"udp://127.0.0.1:{port}"]})
    assert api.server.registrar is not None
    api.server.registrar.stats["bindings_added"] += 2
    status, text, _ = await api.request("GET", "/metrics")
    assert status == 200
    assert "sipwake_sip_registrar_bindings_added_total 2.0" in text.splitlines()
    assert "# TYPE sipwake_sip_registrar_bindings_added_total counter" in text


@pytest.mark.parametrize(
    ("http", "needle"),
    [
        ({"max-body-size": 10}, "[http] max-body-size"),
        ({"rejected-token-webhook": "ftp://x"}, "[http] rejected-token-webhook"),
    ],
)
def test_bad_http_settings_are_refused_naming_the_key(http: dict[str, object], needle: str) -> None:
    from sipwake.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"http": http})
    assert needle in str(err.value)


def test_unauthenticated_api_on_a_public_address_is_warned_about() -> None:
    from sipwake.api.app import unauthenticated_warning

    warning = unauthenticated_warning(["0.0.0.0"], [])
    assert warning is not None
    assert "api-keys" in warning and "unauthenticated" in warning and "0.0.0.0" in warning
    assert unauthenticated_warning(["::", "127.0.0.1"], []) is not None
    assert unauthenticated_warning(["192.0.2.7"], ["k1"]) is None  # keys set
    assert unauthenticated_warning(["127.0.0.1", "::1"], []) is None  # loopback only


async def test_loopback_api_without_keys_starts_without_warning(
    start_api: StartApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="sipwake.api")
    await start_api()
    assert not [r for r in caplog.records if "unauthenticated" in r.getMessage()]
