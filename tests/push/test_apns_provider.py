"""The APNs provider: result mapping and retries (scripted HTTP/2 client), then end to end
against the APNs simulator over real TLS sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sipwake.clock import FakeClock
from sipwake.push.http2 import (
    Http2ConnectError,
    Http2Error,
    Http2QueueTimeout,
    Http2Response,
    Http2Timeout,
)
from sipwake.push.providers.apns import ApnsProvider, ApnsSettings
from sipwake.push.request import (
    CallEndReason,
    Destination,
    Outcome,
    Provider,
    PushKind,
    PushRequest,
    Service,
)

from .apns_helpers import write_cert_pem, write_p8

if TYPE_CHECKING:
    from sipwake.simulator.apns import ApnsSimulator

TOKEN = "ab" * 32
BUNDLE = "org.example.app"
REMOTE = Destination(Provider.APNS, BUNDLE, TOKEN, Service.REMOTE)


# --- scripted client ----------------------------------------------------------------------

Answer = Http2Response | Exception


def answer(status: int, reason: str = "", **headers: str) -> Http2Response:
    body = json.dumps({"reason": reason, "timestamp": 1}).encode() if reason else b""
    return Http2Response(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


class ScriptedClient:
    def __init__(self, base_url: str, answers: list[Answer]) -> None:
        self.base_url = base_url
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, str], bytes, float | None]] = []
        self.closed = False
        self.gate: asyncio.Event | None = None  # when set, answers wait for it
        self.entered = asyncio.Event()

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Http2Response:
        self.requests.append((method, path, dict(headers), body, timeout))
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        item = self.answers.pop(0) if self.answers else answer(200)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, tmp_path: Path, answers: list[Answer], **settings: object) -> None:
        write_p8(tmp_path / "AuthKey_K.p8")
        self.sleeps: list[float] = []
        self.clients: list[ScriptedClient] = []
        self.answers = answers

        def factory(base_url: str, ctx: ssl.SSLContext, s: ApnsSettings) -> ScriptedClient:
            client = ScriptedClient(base_url, self.answers)
            self.clients.append(client)
            return client

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        base: dict[str, object] = {
            "key_file": str(tmp_path / "AuthKey_K.p8"),
            "key_id": "KEY1234567",
            "team_id": "TEAM123456",
        }
        base.update(settings)
        self.provider = ApnsProvider(
            ApnsSettings(**base),  # type: ignore[arg-type]
            clock=FakeClock(),
            sleep=sleep,
            random_fraction=lambda: 1.0,
            client_factory=factory,  # type: ignore[arg-type]
        )

    @property
    def requests(self) -> list[tuple[str, str, dict[str, str], bytes, float | None]]:
        return [r for c in self.clients for r in c.requests]


def push(kind: PushKind = PushKind.MESSAGE, dest: Destination = REMOTE) -> PushRequest:
    return PushRequest(dest, kind, call_id="c1", from_uri="sip:a@x", display_from_uri=True)


async def test_sent_with_bearer_token_and_apple_id(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(200, apns_id="11111111-2222-3333-4444-555555555555")])
    result = await h.provider.send(push())
    assert result.outcome is Outcome.SENT and result.status == 200
    assert result.provider_id == "11111111-2222-3333-4444-555555555555"
    ((method, path, headers, _body, timeout),) = h.requests
    assert (method, path) == ("POST", f"/3/device/{TOKEN}")
    assert headers["authorization"].startswith("bearer ey")
    assert timeout == 10.0
    assert h.clients[0].base_url == "https://api.push.apple.com"


@pytest.mark.parametrize(
    ("status", "reason"),
    [(410, "Unregistered"), (400, "BadDeviceToken"), (400, "DeviceTokenNotForTopic")],
)
async def test_dead_tokens_reported_as_rejected(tmp_path: Path, status: int, reason: str) -> None:
    h = Harness(tmp_path, [answer(status, reason)])
    result = await h.provider.send(push())
    assert (result.outcome, result.reason, result.status) == (
        Outcome.TOKEN_REJECTED,
        reason,
        status,
    )
    assert len(h.requests) == 1


@pytest.mark.parametrize(
    ("status", "reason", "text"),
    [
        (400, "BadTopic", "BadTopic"),
        (403, "InvalidProviderToken", "InvalidProviderToken"),
        (413, "PayloadTooLarge", "PayloadTooLarge"),
        (404, "", "HTTP 404"),
    ],
)
async def test_other_errors_fail_with_reason(
    tmp_path: Path, status: int, reason: str, text: str
) -> None:
    h = Harness(tmp_path, [answer(status, reason)])
    result = await h.provider.send(push())
    assert (result.outcome, result.reason, result.status) == (Outcome.FAILED, text, status)
    assert len(h.requests) == 1 and h.sleeps == []


async def test_expired_provider_token_renewed_and_retried_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(403, "ExpiredProviderToken"), answer(200)])
    result = await h.provider.send(push())
    assert result.ok
    first, second = (r[2]["authorization"] for r in h.requests)
    assert first != second
    assert h.provider.signer is not None and h.provider.signer.renewals == 2


async def test_expired_provider_token_twice_fails(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(403, "ExpiredProviderToken")] * 3)
    result = await h.provider.send(push())
    assert (result.outcome, result.reason) == (Outcome.FAILED, "ExpiredProviderToken")
    assert len(h.requests) == 2


async def test_503_retried_with_growing_backoff(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(503, "ServiceUnavailable")] * 2 + [answer(200)])
    result = await h.provider.send(push())
    assert result.ok and len(h.requests) == 3
    assert h.sleeps == [0.5, 1.0]  # base 0.5 s doubling; jitter fraction pinned to 1


async def test_any_5xx_is_retried(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(502), answer(200)])
    assert (await h.provider.send(push())).ok
    assert len(h.requests) == 2


async def test_retries_are_bounded(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(500, "InternalServerError")] * 10, max_retries=2)
    result = await h.provider.send(push())
    assert (result.outcome, result.reason, result.status) == (
        Outcome.FAILED,
        "InternalServerError",
        500,
    )
    assert len(h.requests) == 3 and len(h.sleeps) == 2


async def test_429_honours_retry_after(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(429, "TooManyRequests", retry_after="7"), answer(200)])
    assert (await h.provider.send(push())).ok
    assert h.sleeps == [7.0]


async def test_retry_after_too_long_fails_instead_of_waiting(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(503, "ServiceUnavailable", retry_after="3600")])
    result = await h.provider.send(push())
    assert (result.outcome, result.reason) == (Outcome.FAILED, "ServiceUnavailable")
    assert h.sleeps == []


async def test_timeout_fails(tmp_path: Path) -> None:
    h = Harness(tmp_path, [Http2Timeout("no answer")], request_timeout=2.5)
    result = await h.provider.send(push())
    assert (result.outcome, result.reason) == (Outcome.FAILED, "timeout")
    assert h.requests[0][4] == 2.5


async def test_connect_failure_retried_then_reported(tmp_path: Path) -> None:
    h = Harness(tmp_path, [Http2ConnectError("TLS handshake failed")] * 5, max_retries=1)
    result = await h.provider.send(push())
    assert result.outcome is Outcome.FAILED
    assert result.reason == "cannot connect: TLS handshake failed"
    assert len(h.requests) == 2


async def test_possibly_processed_push_is_not_resent(tmp_path: Path) -> None:
    h = Harness(tmp_path, [Http2Error("connection lost"), answer(200)])
    result = await h.provider.send(push())
    assert result.outcome is Outcome.FAILED and result.reason.startswith("connection lost")
    assert len(h.requests) == 1


async def test_oversized_payload_never_sent(tmp_path: Path) -> None:
    h = Harness(tmp_path, [])
    request = push()
    request.custom_payload = {"x": "y" * 5000}
    result = await h.provider.send(request)
    assert result.outcome is Outcome.FAILED
    assert result.reason.startswith("payload too large: ") and result.reason.endswith("> 4096")
    assert h.requests == []


async def test_aclose_answers_pushes_under_way_first(tmp_path: Path) -> None:
    h = Harness(tmp_path, [])
    await h.provider.send(push())  # connect
    client = h.clients[0]
    client.gate = asyncio.Event()
    async with asyncio.timeout(10):
        sending = asyncio.create_task(h.provider.send(push()))
        await client.entered.wait()
        closing = asyncio.create_task(h.provider.aclose())
        await asyncio.sleep(0)  # one loop turn: aclose starts and refuses new pushes
        late = await h.provider.send(push())
        assert (late.outcome, late.reason) == (Outcome.FAILED, "APNs provider closed")
        assert not closing.done() and not client.closed
        client.gate.set()
        assert (await sending).ok
        await closing
    assert client.closed


async def test_sandbox_and_production_use_their_servers(tmp_path: Path) -> None:
    h = Harness(tmp_path, [], server="https://prod.test:1", dev_server="https://dev.test:2")
    await h.provider.send(push())
    await h.provider.send(push(dest=Destination(Provider.APNS_DEV, BUNDLE, TOKEN)))
    await h.provider.send(push())
    assert [c.base_url for c in h.clients] == ["https://prod.test:1", "https://dev.test:2"]
    assert [len(c.requests) for c in h.clients] == [2, 1]  # connections are reused
    await h.provider.aclose()
    assert all(c.closed for c in h.clients)


async def test_certificate_auth_sends_no_bearer(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    write_cert_pem(certs / f"{BUNDLE}.voip.prod.pem")
    h = Harness(tmp_path, [], certificate_dir=str(certs))
    await h.provider.send(
        push(PushKind.CALL, Destination(Provider.APNS, BUNDLE, TOKEN, Service.VOIP))
    )
    await h.provider.send(push())  # no certificate for the remote topic: token auth
    (_, _, cert_headers, _, _), (_, _, token_headers, _, _) = h.requests
    assert "authorization" not in cert_headers
    assert "authorization" in token_headers
    assert len(h.clients) == 2  # one connection per credential


async def test_unreachable_destinations_fail_cleanly(tmp_path: Path) -> None:
    h = Harness(tmp_path, [])
    result = await h.provider.send(push(dest=Destination(Provider.FCM, "p", "t")))
    assert result.outcome is Outcome.FAILED and "not an APNs destination" in result.reason
    provider = ApnsProvider(ApnsSettings())
    result = await provider.send(push())
    assert result.outcome is Outcome.FAILED
    assert result.reason == f"no APNs credentials for topic {BUNDLE}"


# --- against the simulator ------------------------------------------------------------------

sim_mod = pytest.importorskip("sipwake.simulator.apns")
APPS = (BUNDLE,)
VOIP_TOKEN = "cd" * 32


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[sim_mod.ApnsSimulator]:
    simulator = sim_mod.ApnsSimulator(tmp_path / "sim", apps=APPS)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


def token_settings(sim: sim_mod.ApnsSimulator, **kw: object) -> ApnsSettings:
    base: dict[str, object] = {
        "key_file": str(sim.key_file),
        "key_id": sim.key_id,
        "team_id": sim.team_id,
        "server": sim.production_url,
        "dev_server": sim.sandbox_url,
        "ca_file": str(sim.ca_file),
        "request_timeout": 5.0,
    }
    base.update(kw)
    return ApnsSettings(**base)  # type: ignore[arg-type]


def cert_settings(sim: sim_mod.ApnsSimulator, **kw: object) -> ApnsSettings:
    base: dict[str, object] = {
        "certificate_dir": str(sim.cert_dir),
        "server": sim.production_url,
        "dev_server": sim.sandbox_url,
        "ca_file": str(sim.ca_file),
        "request_timeout": 5.0,
    }
    base.update(kw)
    return ApnsSettings(**base)  # type: ignore[arg-type]


def every_kind(provider: Provider) -> list[PushRequest]:
    voip = Destination(provider, BUNDLE, VOIP_TOKEN, Service.VOIP, sim_team := None)
    remote = Destination(provider, BUNDLE, TOKEN, Service.REMOTE, sim_team)
    common = {"call_id": "call-9@x", "from_uri": "sip:bob@x", "display_from_uri": True}
    return [
        PushRequest(voip, PushKind.CALL, **common),  # type: ignore[arg-type]
        PushRequest(remote, PushKind.MESSAGE, mutable_content=True, **common),  # type: ignore[arg-type]
        PushRequest(remote, PushKind.BACKGROUND, **common),  # type: ignore[arg-type]
        PushRequest(remote, PushKind.RINGING, **common),  # type: ignore[arg-type]
        PushRequest(
            remote,
            PushKind.CALL_ENDED,
            end_reason=CallEndReason.ANSWERED_ELSEWHERE,
            **common,  # type: ignore[arg-type]
        ),
    ]


@pytest.mark.parametrize("auth", ["token", "certificate"])
@pytest.mark.parametrize("provider_kind", [Provider.APNS, Provider.APNS_DEV])
async def test_every_kind_reaches_the_simulator(
    sim: sim_mod.ApnsSimulator, auth: str, provider_kind: Provider
) -> None:
    settings = token_settings(sim) if auth == "token" else cert_settings(sim)
    provider = ApnsProvider(settings)
    try:
        requests = every_kind(provider_kind)
        results = [await provider.send(r) for r in requests]
    finally:
        await provider.aclose()
    assert [r.outcome for r in results] == [Outcome.SENT] * 5, results
    received = {p.apns_id: p for p in sim.received}
    env = "development" if provider_kind is Provider.APNS_DEV else "production"
    expected = [
        ("voip", f"{BUNDLE}.voip", 10),
        ("alert", BUNDLE, 10),
        ("background", BUNDLE, 5),
        ("alert", BUNDLE, 10),
        ("alert", BUNDLE, 10),
    ]
    for request, result, (push_type, topic, priority) in zip(
        requests, results, expected, strict=True
    ):
        got = received[result.provider_id]
        assert result.provider_id == request.uuid
        assert (got.push_type, got.topic, got.priority) == (push_type, topic, priority)
        assert got.environment == env and got.auth == auth
        assert got.payload["call-id"] == "call-9@x"
    assert received[results[3].provider_id].collapse_id == "call-9@x"
    assert received[results[4].provider_id].payload["aps"]["alert"]["loc-key"] == (
        "IC_ANSWERED_ELSEWHERE"
    )
    assert sim.connections_accepted == (1 if auth == "token" else 2)  # cert: voip + app


async def test_token_rejections_from_the_simulator(sim: sim_mod.ApnsSimulator) -> None:
    gone, bad = "11" * 32, "22" * 32
    sim.set_tokens(unregistered=[gone], bad=[bad])
    provider = ApnsProvider(token_settings(sim))
    try:
        r_gone = await provider.send(push(dest=Destination(Provider.APNS, BUNDLE, gone)))
        r_bad = await provider.send(push(dest=Destination(Provider.APNS, BUNDLE, bad)))
        r_ok = await provider.send(push())
    finally:
        await provider.aclose()
    assert (r_gone.outcome, r_gone.reason, r_gone.status) == (
        Outcome.TOKEN_REJECTED,
        "Unregistered",
        410,
    )
    assert (r_bad.outcome, r_bad.reason, r_bad.status) == (
        Outcome.TOKEN_REJECTED,
        "BadDeviceToken",
        400,
    )
    assert r_ok.ok and len(sim.received) == 1


class SplitClock:
    """Wall and monotonic clocks that move separately (a host that slept)."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall_s = 1_767_225_600.0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_s


async def test_expired_provider_token_refreshed_against_simulator(tmp_path: Path) -> None:
    sim_clock = FakeClock(wall_start=1_767_225_600.0)
    simulator = sim_mod.ApnsSimulator(tmp_path / "sim", apps=APPS, clock=sim_clock)
    await simulator.start()
    clock = SplitClock()
    provider = ApnsProvider(token_settings(simulator), clock=clock)
    try:
        assert (await provider.send(push())).ok
        # An hour passes on the wall clock while the cached token still looks young.
        sim_clock.advance(3700)
        clock.wall_s += 3700
        result = await provider.send(push())
    finally:
        await provider.aclose()
        await simulator.stop()
    assert result.ok, result
    assert provider.signer is not None and provider.signer.renewals == 2
    assert len(simulator.received) == 2


async def test_provider_token_reused_within_apples_update_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    simulator = sim_mod.ApnsSimulator(
        tmp_path / "sim",
        apps=APPS,
        clock=clock,
        token_update_interval=sim_mod.APPLE_TOKEN_UPDATE_INTERVAL,  # Apple's 20 minutes
    )
    await simulator.start()
    provider = ApnsProvider(token_settings(simulator, jwt_max_age=1500.0), clock=clock)
    results = []
    try:
        for step in (0, 600, 599, 301, 1500):  # new tokens at 1500 s and 3000 s
            clock.advance(step)
            results.append(await provider.send(push()))
    finally:
        await provider.aclose()
        await simulator.stop()
    assert all(r.ok for r in results), results
    assert provider.signer is not None and provider.signer.renewals == 3
    assert simulator.connections_accepted == 1


async def test_503_retried_against_simulator(sim: sim_mod.ApnsSimulator) -> None:
    sim.set_faults(fail_first=2)
    sleeps: list[float] = []

    async def no_wait(seconds: float) -> None:
        sleeps.append(seconds)

    provider = ApnsProvider(token_settings(sim), sleep=no_wait)
    try:
        result = await provider.send(push())
    finally:
        await provider.aclose()
    assert result.ok and len(sleeps) == 2
    assert [p.apns_id for p in sim.received] == [result.provider_id]


async def test_timeout_against_simulator(sim: sim_mod.ApnsSimulator) -> None:
    sim.set_faults(delay=5)
    provider = ApnsProvider(token_settings(sim, request_timeout=0.2))
    try:
        result = await provider.send(push())
    finally:
        await provider.aclose()
    assert (result.outcome, result.reason) == (Outcome.FAILED, "timeout")


async def test_goaway_between_pushes_reconnects(sim: sim_mod.ApnsSimulator) -> None:
    sim.set_faults(goaway_after=3)
    provider = ApnsProvider(token_settings(sim))
    try:
        results = [await provider.send(push()) for _ in range(7)]
    finally:
        await provider.aclose()
    assert all(r.ok for r in results), results
    assert sorted(p.apns_id for p in sim.received) == sorted(r.provider_id for r in results)
    assert sim.connections_accepted == 3


async def test_goaway_mid_batch_loses_and_doubles_nothing(sim: sim_mod.ApnsSimulator) -> None:
    sim.set_faults(goaway_after=150)
    provider = ApnsProvider(token_settings(sim, request_timeout=5.0))
    tokens = [f"{i:064x}" for i in range(1000)]
    requests = [push(dest=Destination(Provider.APNS, BUNDLE, t)) for t in tokens]
    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(provider.send(r) for r in requests))
    finally:
        await provider.aclose()
    assert Counter(r.outcome for r in results) == {Outcome.SENT: 1000}
    counts = Counter(p.apns_id for p in sim.received)
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert set(counts) == {r.uuid for r in requests}
    assert sim.connections_accepted >= 1000 // 150  # the GOAWAYs did happen


async def test_wrong_environment_certificate_is_refused(sim: sim_mod.ApnsSimulator) -> None:
    prod_only = sim.client_cert_file(BUNDLE, "prod")
    provider = ApnsProvider(cert_settings(sim, certificate_dir="", cert_file=str(prod_only)))
    try:
        result = await provider.send(push(dest=Destination(Provider.APNS_DEV, BUNDLE, TOKEN)))
    finally:
        await provider.aclose()
    assert (result.outcome, result.reason, result.status) == (
        Outcome.FAILED,
        "BadCertificateEnvironment",
        403,
    )


async def test_request_expired_unsent_fails_saying_so(tmp_path: Path) -> None:
    h = Harness(tmp_path, [Http2QueueTimeout("not sent to x: no free stream within 2s")])
    result = await h.provider.send(push())
    assert result.outcome is Outcome.FAILED
    assert result.reason == "timeout, not sent to x: no free stream within 2s"


async def test_non_ascii_digit_retry_after_is_ignored(tmp_path: Path) -> None:
    h = Harness(tmp_path, [answer(429, "TooManyRequests", retry_after="²"), answer(200)])
    assert (await h.provider.send(push())).ok
    assert h.sleeps == [0.5]  # the backoff, as without Retry-After


async def test_message_to_a_voip_token_is_refused_and_never_sent(sim: ApnsSimulator) -> None:
    provider = ApnsProvider(token_settings(sim))
    voip = Destination(Provider.APNS, BUNDLE, TOKEN, Service.VOIP)
    try:
        result = await provider.send(push(PushKind.MESSAGE, voip))
        call = await provider.send(push(PushKind.CALL, voip))
    finally:
        await provider.aclose()
    assert result.outcome is Outcome.FAILED  # not TOKEN_REJECTED: the token stays
    assert "only calls go to PushKit" in result.reason
    assert call.ok
    assert [p.headers["apns-push-type"] for p in sim.received] == ["voip"]
