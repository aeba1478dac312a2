"""The FCM and Web Push simulators refuse what Google and push services refuse."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sipwake.push import jws
from sipwake.push.providers.fcm_auth import SCOPE, ServiceAccount
from sipwake.simulator.fcm import GRANT_TYPE, FcmSimulator
from sipwake.simulator.webpush import WebPushSimulator


@pytest.fixture
async def fcm() -> AsyncIterator[FcmSimulator]:
    sim = await FcmSimulator().start()
    yield sim
    await sim.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post_token(http: aiohttp.ClientSession, url: str, assertion: str) -> tuple[int, Any]:
    body = urlencode({"grant_type": GRANT_TYPE, "assertion": assertion})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def claims(account: ServiceAccount, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": account.client_email, "scope": SCOPE, "aud": account.token_uri,
            "iat": now, "exp": now + 3600}  # fmt: skip
    base.update(over)
    return base


async def test_token_endpoint_checks_signature_audience_scope_and_time(
    fcm: FcmSimulator, http: aiohttp.ClientSession
) -> None:
    account = ServiceAccount.from_json(fcm.create_service_account("p1"))
    ok, answer = await post_token(http, fcm.token_uri, account.assertion(time.time()))
    assert ok == 200 and answer["access_token"].startswith("ya29.") and answer["expires_in"] > 0
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cases = {
        "signature": jws.sign(claims(account), stranger),
        "audience": jws.sign(claims(account, aud="https://elsewhere/token"), account.private_key),
        "scope": jws.sign(claims(account, scope="openid"), account.private_key),
        "expired": jws.sign(claims(account, iat=1000, exp=2000), account.private_key),
        "lifetime": jws.sign(claims(account, exp=int(time.time()) + 7200), account.private_key),
        "issuer": jws.sign(claims(account, iss="nobody@x"), account.private_key),
    }
    for name, assertion in cases.items():
        status, answer = await post_token(http, fcm.token_uri, assertion)
        assert status == 400 and answer["error"] == "invalid_grant", name
    assert len(fcm.access_tokens) == 1


async def send(
    http: aiohttp.ClientSession, fcm: FcmSimulator, token: str | None, body: Any
) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    url = f"{fcm.url}/v1/projects/p1/messages:send"
    async with http.post(url, data=json.dumps(body), headers=headers) as resp:
        return resp.status, await resp.json()


async def test_messages_send_checks_bearer_and_shape(
    fcm: FcmSimulator, http: aiohttp.ClientSession
) -> None:
    account = ServiceAccount.from_json(fcm.create_service_account("p1"))
    _, answer = await post_token(http, fcm.token_uri, account.assertion(time.time()))
    token = answer["access_token"]
    good = {"message": {"token": "t", "android": {"priority": "high", "ttl": "30s",
                                                   "data": {"a": "b"}}}}  # fmt: skip
    status, _ = await send(http, fcm, None, good)
    assert status == 401
    status, _ = await send(http, fcm, "ya29.forged", good)
    assert status == 401
    bad_bodies = [
        {"message": {"android": {}}},
        {"message": {"token": "t", "android": {"data": {"n": 1}}}},
        {"message": {"token": "t", "android": {"ttl": "30"}}},
        {"message": {"token": "t", "android": {"ttl": "9999999s"}}},
        {"message": {"token": "t", "android": {"priority": "urgent"}}},
    ]
    for body in bad_bodies:
        status, answer = await send(http, fcm, token, body)
        assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT", body
    status, answer = await send(http, fcm, token, good)
    assert status == 200 and answer["name"].startswith("projects/p1/messages/")
    assert len(fcm.messages) == 1


async def test_service_account_file_is_private_and_reusable(tmp_path: Path) -> None:
    first = await FcmSimulator().start()
    path = tmp_path / "sa.json"
    first.create_service_account("p1", path)
    await first.aclose()
    assert path.stat().st_mode & 0o077 == 0
    second = await FcmSimulator().start()
    try:
        assert second.trust_service_account(path, "p1")
        assert not second.trust_service_account(path, "other-project")
        account = ServiceAccount.load(path)
        assert account.token_uri == second.token_uri  # rewritten to the new port
    finally:
        await second.aclose()


async def test_webpush_refuses_missing_or_forged_vapid(http: aiohttp.ClientSession) -> None:
    sim = await WebPushSimulator().start()
    try:
        sub = sim.subscribe()
        async with http.post(sub.endpoint, headers={"ttl": "30"}) as resp:
            assert resp.status == 401
        key = ec.generate_private_key(ec.SECP256R1())
        other = ec.generate_private_key(ec.SECP256R1())
        token = jws.sign({"aud": sim.url, "exp": int(time.time()) + 600, "sub": "mailto:a@b"}, key)
        from sipwake.push.ece import public_key_bytes

        forged = f"vapid t={token}, k={jws.b64url_encode(public_key_bytes(other.public_key()))}"
        async with http.post(sub.endpoint, headers={"ttl": "30", "authorization": forged}) as resp:
            assert resp.status == 401
        good = f"vapid t={token}, k={jws.b64url_encode(public_key_bytes(key.public_key()))}"
        async with http.post(sub.endpoint, headers={"authorization": good}) as resp:
            assert resp.status == 400  # TTL is required (RFC 8030)
        async with http.post(sub.endpoint, headers={"ttl": "30", "authorization": good}) as resp:
            assert resp.status == 201 and resp.headers["location"].startswith(sim.url)
        assert len(sim.received) == 1
    finally:
        await sim.aclose()
