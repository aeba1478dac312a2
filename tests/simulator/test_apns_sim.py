"""The APNs simulator answers like APNs: each rule, checked with a real HTTP/2 client."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sipwake.clock import FakeClock
from sipwake.simulator.apns import ApnsSimulator, sign_provider_token
from sipwake.simulator.tls import Pki

from .conftest import Connect
from .h2client import H2Client, Response

TOKEN = "a1" * 32
APP = "org.example.app"
ALERT = json.dumps({"aps": {"alert": {"title": "hi"}}}).encode()


def headers(sim: ApnsSimulator, **extra: str | None) -> list[tuple[str, str]]:
    """Valid token-auth alert headers; ``extra`` overrides (None removes a header)."""
    base: dict[str, str | None] = {
        "authorization": f"bearer {sim.provider_token()}",
        "apns-topic": APP,
        "apns-push-type": "alert",
        "apns-priority": "10",
    }
    for k, v in extra.items():
        base[k.replace("_", "-")] = v
    return [(k, v) for k, v in base.items() if v is not None]


async def push(
    client: H2Client,
    sim: ApnsSimulator,
    token: str = TOKEN,
    body: bytes = ALERT,
    method: str = "POST",
    **extra: str | None,
) -> Response:
    return await client.request(method, f"/3/device/{token}", headers(sim, **extra), body)


def reason(resp: Response) -> str:
    return str(resp.json()["reason"])


# -- accepted pushes -------------------------------------------------------------------------


async def test_accepted_push_is_recorded_and_apns_id_echoed(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect("prod")
    apns_id = str(uuid.uuid4())
    resp = await push(client, sim, apns_id=apns_id, apns_collapse_id="c1", apns_expiration="0")
    assert (resp.status, resp.body) == (200, b"")
    assert resp.headers["apns-id"] == apns_id
    assert "apns-unique-id" not in resp.headers  # development only
    [rec] = sim.received
    assert rec.environment == "production"
    assert (rec.token, rec.topic, rec.push_type, rec.priority) == (TOKEN, APP, "alert", 10)
    assert (rec.apns_id, rec.collapse_id, rec.expiration) == (apns_id, "c1", 0)
    assert rec.payload == json.loads(ALERT)
    assert (rec.auth, rec.team_id) == ("token", sim.team_id)
    assert "authorization" not in rec.headers  # a credential is never recorded


async def test_sandbox_generates_apns_id_and_unique_id(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect("dev")
    resp = await push(client, sim)
    assert resp.status == 200
    uuid.UUID(resp.headers["apns-id"])
    uuid.UUID(resp.headers["apns-unique-id"])
    assert sim.received[0].environment == "development"
    assert sim.received[0].apns_id == resp.headers["apns-id"]


async def test_voip_push_with_larger_payload(sim: ApnsSimulator, connect: Connect) -> None:
    client = await connect()
    body = json.dumps({"pad": "x" * (5120 - 11)}).encode()
    assert len(body) == 5120
    resp = await push(client, sim, body=body, apns_topic=APP + ".voip", apns_push_type="voip")
    assert resp.status == 200
    resp = await push(
        client, sim, body=body + b" ", apns_topic=APP + ".voip", apns_push_type="voip"
    )
    assert (resp.status, reason(resp)) == (413, "PayloadTooLarge")


async def test_background_push_needs_priority_5_and_content_available(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect()
    silent = json.dumps({"aps": {"content-available": 1}}).encode()
    ok = await push(client, sim, body=silent, apns_push_type="background", apns_priority="5")
    assert ok.status == 200
    high = await push(client, sim, body=silent, apns_push_type="background")
    assert (high.status, reason(high)) == (400, "BadPriority")
    loud = await push(client, sim, body=ALERT, apns_push_type="background", apns_priority="5")
    assert (loud.status, reason(loud)) == (400, "InvalidPushType")
    assert len(sim.received) == 1


@pytest.mark.parametrize(
    ("push_type", "suffix"),
    [
        ("alert", ""),
        ("background", ""),
        ("controls", ""),
        ("mdm", ""),
        ("voip", ".voip"),
        ("complication", ".complication"),
        ("fileprovider", ".pushkit.fileprovider"),
        ("location", ".location-query"),
        ("liveactivity", ".push-type.liveactivity"),
        ("pushtotalk", ".voip-ptt"),
    ],
)
async def test_every_push_type_with_its_topic(
    sim: ApnsSimulator, connect: Connect, push_type: str, suffix: str
) -> None:
    client = await connect()
    body = ALERT
    prio = "10"
    if push_type == "background":
        body, prio = json.dumps({"aps": {"content-available": 1}}).encode(), "5"
    resp = await push(
        client,
        sim,
        body=body,
        apns_topic=APP + suffix,
        apns_push_type=push_type,
        apns_priority=prio,
    )
    assert resp.status == 200
    assert (sim.received[0].push_type, sim.received[0].topic) == (push_type, APP + suffix)
    if suffix:  # the same type on the bare bundle topic is refused
        resp = await push(client, sim, body=body, apns_push_type=push_type, apns_priority=prio)
        assert (resp.status, reason(resp)) == (400, "InvalidPushType")


# -- one table for the header and payload rules ------------------------------------------------

CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("get", {"method": "GET"}, 405, "MethodNotAllowed"),
    ("path", {"path": "/3/devices/" + TOKEN}, 404, "BadPath"),
    ("path-version", {"path": "/2/device/" + TOKEN}, 404, "BadPath"),
    ("no-token", {"path": "/3/device/"}, 400, "MissingDeviceToken"),
    ("short-token", {"token": "ab" * 31}, 400, "BadDeviceToken"),
    ("odd-token", {"token": TOKEN + "a"}, 400, "BadDeviceToken"),
    ("non-hex-token", {"token": "zz" * 32}, 400, "BadDeviceToken"),
    ("no-topic", {"apns_topic": None}, 400, "MissingTopic"),
    ("bad-topic", {"apns_topic": "org example"}, 400, "BadTopic"),
    ("other-topic", {"apns_topic": "com.other.app"}, 400, "TopicDisallowed"),
    ("push-type", {"apns_push_type": "loud"}, 400, "InvalidPushType"),
    ("voip-topic", {"apns_push_type": "voip"}, 400, "InvalidPushType"),
    ("alert-on-voip", {"apns_topic": APP + ".voip"}, 400, "InvalidPushType"),
    ("priority", {"apns_priority": "7"}, 400, "BadPriority"),
    ("expiration", {"apns_expiration": "soon"}, 400, "BadExpirationDate"),
    ("negative-expiration", {"apns_expiration": "-1"}, 400, "BadExpirationDate"),
    ("apns-id", {"apns_id": "1234"}, 400, "BadMessageId"),
    ("collapse-id", {"apns_collapse_id": "c" * 65}, 400, "BadCollapseId"),
    ("empty", {"body": b""}, 400, "PayloadEmpty"),
    ("too-large", {"body": json.dumps({"p": "x" * 4090}).encode()}, 413, "PayloadTooLarge"),
    ("not-json", {"body": b"{aps:"}, 400, "BadPayload"),
    ("not-object", {"body": b"[1]"}, 400, "BadPayload"),
    ("deep-json", {"body": b"[" * 4000}, 400, "BadPayload"),
    ("aps-not-object", {"body": b'{"aps": 1}'}, 400, "BadPayload"),
    ("no-auth", {"authorization": None}, 403, "MissingProviderToken"),
    ("not-bearer", {"authorization": "basic abc"}, 403, "InvalidProviderToken"),
    ("garbage-jwt", {"authorization": "bearer a.b.c"}, 403, "InvalidProviderToken"),
    (
        "deep-jwt",
        {"authorization": "bearer " + "W1tb" * 2000 + ".e30.AA"},
        403,
        "InvalidProviderToken",
    ),
    ("empty-bearer", {"authorization": "bearer "}, 403, "MissingProviderToken"),
]


@pytest.mark.parametrize(("name", "change", "status", "why"), CASES, ids=[c[0] for c in CASES])
async def test_rule(
    sim: ApnsSimulator,
    connect: Connect,
    name: str,
    change: dict[str, Any],
    status: int,
    why: str,
) -> None:
    client = await connect()
    change = dict(change)
    method = change.pop("method", "POST")
    token = change.pop("token", TOKEN)
    path = change.pop("path", f"/3/device/{token}")
    body = change.pop("body", ALERT)
    resp = await client.request(method, path, headers(sim, **change), body)
    assert (resp.status, reason(resp)) == (status, why)
    assert resp.headers["content-type"] == "application/json"
    uuid.UUID(resp.headers["apns-id"])
    assert sim.received == []


async def test_duplicate_headers(sim: ApnsSimulator, connect: Connect) -> None:
    client = await connect()
    hdrs = [*headers(sim), ("apns-topic", APP)]
    resp = await client.request("POST", f"/3/device/{TOKEN}", hdrs, ALERT)
    assert (resp.status, reason(resp)) == (400, "DuplicateHeaders")


async def test_invalid_utf8_token_is_a_bad_device_token(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect()
    path = b"/3/device/" + b"\xff" * 64
    resp = await client.request("POST", path, headers(sim), ALERT)  # type: ignore[arg-type]
    assert (resp.status, reason(resp)) == (400, "BadDeviceToken")


async def test_payload_limit_is_4096_bytes_for_alerts(sim: ApnsSimulator, connect: Connect) -> None:
    client = await connect()
    body = json.dumps({"aps": {"alert": "x" * (4096 - 22)}}).encode()
    assert len(body) == 4096
    assert (await push(client, sim, body=body)).status == 200
    resp = await push(client, sim, body=body[:-1] + b" }")
    assert (resp.status, reason(resp)) == (413, "PayloadTooLarge")


# -- token lists and environments --------------------------------------------------------------


async def test_token_lists(sim: ApnsSimulator, connect: Connect, clock: FakeClock) -> None:
    gone, bad, dev_only, voip_only = "01" * 32, "02" * 32, "03" * 32, "04" * 32
    expired = "05" * 32
    sim.set_tokens(
        unregistered=[gone],
        expired=[expired],
        bad=[bad],
        development=[dev_only],
        topics={voip_only: APP + ".voip"},
    )
    prod = await connect("prod")
    dev = await connect("dev")
    resp = await push(prod, sim, token=gone)
    assert resp.status == 410
    assert resp.json() == {"reason": "Unregistered", "timestamp": int(clock.wall() * 1000)}
    resp = await push(prod, sim, token=expired)
    assert resp.json() == {"reason": "ExpiredToken", "timestamp": int(clock.wall() * 1000)}
    resp = await push(prod, sim, token=bad.upper())
    assert (resp.status, reason(resp)) == (400, "BadDeviceToken")
    resp = await push(prod, sim, token=dev_only)
    assert (resp.status, reason(resp)) == (400, "BadDeviceToken")
    assert (await push(dev, sim, token=dev_only)).status == 200
    resp = await push(prod, sim, token=voip_only)
    assert (resp.status, reason(resp)) == (400, "DeviceTokenNotForTopic")
    assert [r.token for r in sim.received] == [dev_only]


def der_signed(sim: ApnsSimulator, iat: float) -> str:
    """A token whose signature is DER-encoded, a common mistake (JWS wants raw r||s)."""
    header, claims, _ = sim.provider_token(iat).split(".")
    der = sim.signing_key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    return f"{header}.{claims}.{base64.urlsafe_b64encode(der).rstrip(b'=').decode()}"


# -- provider tokens ---------------------------------------------------------------------------


async def test_provider_token_checks(
    sim: ApnsSimulator, connect: Connect, clock: FakeClock
) -> None:
    now = clock.wall()
    other_key = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "wrong key": sign_provider_token(other_key, sim.key_id, sim.team_id, now),
        "wrong kid": sign_provider_token(sim.signing_key, "ABCDEFGHIJ", sim.team_id, now),
        "wrong iss": sign_provider_token(sim.signing_key, sim.key_id, "ABCDEFGHIJ", now),
        "future iat": sign_provider_token(sim.signing_key, sim.key_id, sim.team_id, now + 60),
        "DER signature": der_signed(sim, now),
    }
    for name, jwt in cases.items():
        client = await connect()
        resp = await push(client, sim, authorization=f"bearer {jwt}")
        assert (resp.status, reason(resp)) == (403, "InvalidProviderToken"), name
    client = await connect()
    stale = sign_provider_token(sim.signing_key, sim.key_id, sim.team_id, now - 3601)
    resp = await push(client, sim, authorization=f"bearer {stale}")
    assert (resp.status, reason(resp)) == (403, "ExpiredProviderToken")
    assert sim.received == []


async def test_token_expires_on_a_live_connection(
    sim: ApnsSimulator, connect: Connect, clock: FakeClock
) -> None:
    client = await connect()
    jwt = sim.provider_token()
    assert (await push(client, sim, authorization=f"bearer {jwt}")).status == 200
    clock.advance(3601)
    resp = await push(client, sim, authorization=f"bearer {jwt}")
    assert (resp.status, reason(resp)) == (403, "ExpiredProviderToken")
    assert (await push(client, sim)).status == 200  # a fresh token works again


async def test_one_team_per_connection(sim: ApnsSimulator, connect: Connect) -> None:
    team, key = sim.add_team(apps=["org.other.app"])
    other_jwt = sign_provider_token(key, team.key_id, team.team_id, sim.clock.wall())
    client = await connect()
    assert (await push(client, sim)).status == 200
    resp = await push(client, sim, authorization=f"bearer {other_jwt}", apns_topic="org.other.app")
    assert (resp.status, reason(resp)) == (403, "InvalidProviderToken")
    fresh = await connect()
    resp = await push(fresh, sim, authorization=f"bearer {other_jwt}", apns_topic="org.other.app")
    assert resp.status == 200
    resp = await push(fresh, sim, authorization=f"bearer {other_jwt}")  # not its app
    assert (resp.status, reason(resp)) == (400, "TopicDisallowed")


async def test_too_many_provider_token_updates(
    sim: ApnsSimulator, connect: Connect, clock: FakeClock
) -> None:
    sim.rules.token_update_interval = 1200
    client = await connect()
    assert (await push(client, sim)).status == 200
    clock.advance(60)
    resp = await push(client, sim)  # a new token (new iat) after one minute
    assert (resp.status, reason(resp)) == (429, "TooManyProviderTokenUpdates")
    clock.advance(1200)
    assert (await push(client, sim)).status == 200


# -- client certificates -----------------------------------------------------------------------


async def test_certificate_auth(sim: ApnsSimulator, connect: Connect) -> None:
    prod_cert = sim.client_cert_file(APP, "prod")
    assert prod_cert == sim.cert_dir / f"{APP}.prod.pem"
    client = await connect("prod", cert=prod_cert)
    assert (await push(client, sim, authorization=None)).status == 200
    voip = await push(
        client, sim, authorization=None, apns_topic=APP + ".voip", apns_push_type="voip"
    )
    assert voip.status == 200
    missing = await push(client, sim, authorization=None, apns_topic=None)
    assert (missing.status, reason(missing)) == (400, "MissingTopic")
    other = await push(client, sim, authorization=None, apns_topic="com.other.app")
    assert (other.status, reason(other)) == (400, "TopicDisallowed")
    assert [(r.auth, r.certificate_uid) for r in sim.received] == [("certificate", APP)] * 2


async def test_voip_certificate_defaults_its_topic(sim: ApnsSimulator, connect: Connect) -> None:
    cert = sim.client_cert_file(APP, "dev", voip=True)
    assert cert.name == f"{APP}.voip.dev.pem"
    client = await connect("dev", cert=cert)
    resp = await push(client, sim, authorization=None, apns_topic=None, apns_push_type="voip")
    assert resp.status == 200
    assert sim.received[0].topic == APP + ".voip"
    alert = await push(client, sim, authorization=None)
    assert (alert.status, reason(alert)) == (400, "TopicDisallowed")


async def test_certificate_for_the_wrong_environment(sim: ApnsSimulator, connect: Connect) -> None:
    client = await connect("prod", cert=sim.client_cert_file(APP, "dev"))
    resp = await push(client, sim, authorization=None)
    assert (resp.status, reason(resp)) == (403, "BadCertificateEnvironment")


async def test_certificate_that_is_not_an_apns_certificate(
    sim: ApnsSimulator, connect: Connect, tmp_path: Path
) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "just a client")])
    cert = sim.pki.ensure_client_pem(tmp_path / "plain.pem", subject)
    client = await connect("prod", cert=cert)
    resp = await push(client, sim, authorization=None)
    assert (resp.status, reason(resp)) == (403, "BadCertificate")


async def test_certificate_from_another_ca_fails_the_handshake(
    sim: ApnsSimulator, tmp_path: Path
) -> None:
    stranger = Pki(tmp_path / "stranger")
    stranger.ensure()
    cert = stranger.ensure_client_pem(tmp_path / "x.pem", sim.pki.ca_cert.subject)
    ctx = sim.pki.client_context(cert)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client = await H2Client.connect(sim.production_url, ctx)
        try:
            await client.request("POST", f"/3/device/{TOKEN}", headers(sim), ALERT)
        finally:
            await client.close()
    assert sim.received == []


async def test_http1_only_client_is_refused(sim: ApnsSimulator) -> None:
    ctx = sim.pki.client_context(alpn=("http/1.1",))
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port("prod"), ssl=ctx)
    try:
        writer.write(b"POST /3/device/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        assert await reader.read() == b""  # closed without an answer
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


# -- faults ------------------------------------------------------------------------------------


async def test_fail_first_then_succeed(sim: ApnsSimulator, connect: Connect) -> None:
    sim.set_faults(fail_first=2, retry_after=3)
    client = await connect()
    for _ in range(2):
        resp = await push(client, sim)
        assert (resp.status, reason(resp)) == (503, "ServiceUnavailable")
        assert resp.headers["retry-after"] == "3"
    assert (await push(client, sim)).status == 200
    assert len(sim.received) == 1
    sim.set_faults(fail_first=1, fail_status=429, retry_after=0)
    resp = await push(client, sim)
    assert (resp.status, reason(resp)) == (429, "TooManyRequests")


async def test_goaway_after_n_streams(sim: ApnsSimulator, connect: Connect) -> None:
    sim.set_faults(goaway_after=2)
    client = await connect()
    futures = [
        client.start("POST", "/3/device/" + f"{i:02x}" * 32, headers(sim), ALERT) for i in range(4)
    ]
    async with asyncio.timeout(10):
        results = await asyncio.gather(*futures, return_exceptions=True)
    ok = [r for r in results if isinstance(r, Response)]
    refused = [r for r in results if isinstance(r, Exception)]
    assert [r.status for r in ok] == [200, 200]
    assert len(refused) == 2
    await asyncio.wait_for(client.closed.wait(), 10)
    assert client.goaway is not None
    assert client.goaway.last_stream_id == 3  # streams 1 and 3 were processed
    assert [r.stream_id for r in sim.received] == [1, 3]
    assert sorted(r.token for r in sim.received) == sorted([f"{0:02x}" * 32, f"{1:02x}" * 32])


async def test_pushes_to_one_token_are_throttled(
    sim: ApnsSimulator, connect: Connect, clock: FakeClock
) -> None:
    sim.set_faults(token_limit=2, token_window=10)
    client = await connect()
    assert [(await push(client, sim)).status for _ in range(2)] == [200, 200]
    resp = await push(client, sim)
    assert (resp.status, reason(resp)) == (429, "TooManyRequests")
    assert (await push(client, sim, token="b2" * 32)).status == 200  # another device
    clock.advance(10)
    assert (await push(client, sim)).status == 200
    assert len(sim.received) == 4


async def test_delay_still_answers(sim: ApnsSimulator, connect: Connect) -> None:
    sim.set_faults(delay=0.01)
    client = await connect()
    assert (await push(client, sim)).status == 200


async def test_idle_connection_gets_goaway_idle_timeout(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect()
    assert (await push(client, sim)).status == 200
    sim.set_faults(idle_timeout=0.05)
    await asyncio.wait_for(client.closed.wait(), 10)
    assert client.goaway is not None
    assert client.goaway.last_stream_id == 1
    assert json.loads(client.goaway.additional_data) == {"reason": "IdleTimeout"}


async def test_require_push_type(sim: ApnsSimulator, connect: Connect) -> None:
    client = await connect()
    inferred = await push(client, sim, apns_topic=APP + ".voip", apns_push_type=None)
    assert inferred.status == 200
    assert sim.received[0].push_type == "voip"
    sim.rules.require_push_type = True
    resp = await push(client, sim, apns_push_type=None)
    assert (resp.status, reason(resp)) == (400, "InvalidPushType")


async def test_records_are_bounded(tmp_path: Path, clock: FakeClock) -> None:
    async with ApnsSimulator(tmp_path, clock=clock, max_records=10) as sim:
        client = await H2Client.connect(sim.production_url, sim.pki.client_context())
        try:
            for i in range(12):
                assert (await push(client, sim, token=f"{i:064x}")).status == 200
        finally:
            await client.close()
        assert [int(p.token, 16) for p in sim.received] == list(range(2, 12))


async def test_stop_answers_delayed_streams_then_goaway_shutdown(tmp_path: Path) -> None:
    sim = ApnsSimulator(tmp_path)
    await sim.start()
    client = await H2Client.connect(sim.production_url, sim.pki.client_context())
    try:
        sim.set_faults(delay=30)  # never elapses: stop() must answer it
        pending = client.start("POST", f"/3/device/{TOKEN}", headers(sim), ALERT)
        await asyncio.wait_for(sim.wait_for_pushes(1), 10)
        await sim.stop()
        resp = await asyncio.wait_for(pending, 10)
        assert resp.status == 200
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.goaway is not None
        assert client.goaway.last_stream_id == resp.stream_id
        assert json.loads(client.goaway.additional_data) == {"reason": "Shutdown"}
    finally:
        await client.close()
        await sim.stop()


async def test_many_concurrent_streams_each_answered_and_recorded_once(
    sim: ApnsSimulator, connect: Connect
) -> None:
    client = await connect()
    await asyncio.wait_for(client.remote_settings_seen.wait(), 10)
    tokens = [f"{i:064x}" for i in range(300)]
    hdrs = headers(sim)
    futures = [client.start("POST", f"/3/device/{t}", hdrs, ALERT) for t in tokens]
    async with asyncio.timeout(20):
        results = await asyncio.gather(*futures)
        await sim.wait_for_pushes(300)
    assert {r.status for r in results} == {200}
    assert len({r.headers["apns-id"] for r in results}) == 300
    assert sorted(p.token for p in sim.received) == sorted(tokens)
    assert sim.connections_accepted == 1


async def test_max_concurrent_streams_is_advertised(tmp_path: Path) -> None:
    async with ApnsSimulator(tmp_path, max_concurrent_streams=7) as sim:
        client = await H2Client.connect(sim.production_url, sim.pki.client_context())
        try:
            await asyncio.wait_for(client.remote_settings_seen.wait(), 10)
            assert client.conn.remote_settings.max_concurrent_streams == 7
        finally:
            await client.close()


# -- state directory ---------------------------------------------------------------------------


async def test_credentials_are_reused_across_runs(tmp_path: Path) -> None:
    first = ApnsSimulator(tmp_path)
    first.prepare()
    ca = first.ca_file.read_bytes()
    cert = first.client_cert_file(APP, "prod").read_bytes()
    second = ApnsSimulator(tmp_path)
    second.prepare()
    assert (second.team_id, second.key_id) == (first.team_id, first.key_id)
    assert second.key_file == first.key_file
    assert second.key_file.name == f"AuthKey_{first.key_id}.p8"
    assert second.ca_file.read_bytes() == ca
    assert second.client_cert_file(APP, "prod").read_bytes() == cert
    assert first.key_file.stat().st_mode & 0o077 == 0  # private keys are owner-only
