"""``POST /v1/push``: batches with one result per item, and the rejected-token webhook."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sipwake.simulator.apns import ApnsSimulator
from tests.conftest import free_port

from .conftest import APP, DEAD, TOKEN, TOKEN2, Api, StartApi


async def test_mixed_batch_gets_one_result_per_item_in_order(api: Api, sim: ApnsSimulator) -> None:
    batch: list[Any] = [
        {"provider": "apns", "param": f"{sim.team_id}.{APP}.voip", "prid": TOKEN2,
         "type": "call", "caller": "sip:alice@example.org", "call_id": "c-9", "ttl": 30},
        {"app_id": APP, "token": TOKEN, "type": "message", "text": "hello",
         "custom_payload": {"room": "r1"}},
        {"provider": "apns", "param": APP, "prid": DEAD, "type": "background"},
        {"provider": "apns", "param": "com.nobody.app", "prid": TOKEN, "type": "message"},
        {"provider": "apns", "param": APP, "prid": TOKEN, "type": "shout"},
        "not an object",
        {"app_id": APP, "token": TOKEN, "type": "cancel", "call_id": "c-9",
         "cancel_reason": "answered-elsewhere"},
    ]  # fmt: skip
    status, data, _ = await api.post("/v1/push", {"notifications": batch})
    assert status == 200
    results = data["results"]
    assert [r["status"] for r in results] == [
        "sent", "sent", "token-rejected", "failed", "failed", "failed", "sent",
    ]  # fmt: skip
    assert results[0]["id"] and results[1]["id"]
    assert results[2]["reason"] == "Unregistered"
    assert "no configured provider" in results[3]["reason"]
    assert results[4]["reason"].startswith("invalid: type")
    assert results[5]["reason"] == "invalid: expected a JSON object"
    assert data["summary"] == {"sent": 3, "failed": 3, "token-rejected": 1}
    by_token = {(p.token, p.push_type): p for p in sim.received}
    call = by_token[(TOKEN2, "voip")]
    assert call.apns_id == results[0]["id"]
    assert call.payload["call-id"] == "c-9"
    assert call.payload["from-uri"] == "sip:alice@example.org"
    message = next(p for p in sim.received if p.apns_id == results[1]["id"])
    assert message.payload["customPayload"] == {"room": "r1"}
    cancel = next(p for p in sim.received if p.apns_id == results[6]["id"])
    assert cancel.payload["aps"]["alert"]["loc-key"] == "IC_ANSWERED_ELSEWHERE"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"null", "notifications"),
        (b"[]", "notifications"),
        (b'{"notifications": {"a": 1}}', "notifications"),
        (b'{"notifications": [', "invalid JSON"),
    ],
)
async def test_malformed_batches_are_http_400(api: Api, body: bytes, needle: str) -> None:
    headers = {"Content-Type": "application/json"}
    status, data, _ = await api.post("/v1/push", data=body, headers=headers)
    assert status == 400
    assert needle in data["errors"][0]["detail"]


async def test_item_errors_name_the_field(api: Api) -> None:
    items = [
        {"provider": "apns", "param": APP, "type": "call"},
        {"provider": "carrier-pigeon", "param": APP, "prid": TOKEN, "type": "call"},
        {"app_id": APP, "token": TOKEN, "type": "message", "ttl": -5},
        {"app_id": APP, "token": TOKEN, "type": "message", "custom_payload": [1]},
        {"app_id": "com.unknown", "token": TOKEN, "type": "message"},
    ]
    status, data, _ = await api.post("/v1/push", {"notifications": items})
    assert status == 200
    reasons = [r["reason"] for r in data["results"]]
    assert reasons[0].startswith("invalid: prid")
    assert reasons[1].startswith("invalid: provider")
    assert reasons[2].startswith("invalid: ttl")
    assert reasons[3].startswith("invalid: custom_payload")
    assert reasons[4].startswith("invalid: app_id")


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, asyncio.Queue[Any]]]:
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def hook(request: web.Request) -> web.Response:
        await got.put(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", got
    await runner.cleanup()


async def test_rejected_tokens_are_posted_to_the_webhook(
    start_api: StartApi, webhook: tuple[str, asyncio.Queue[Any]]
) -> None:
    url, got = webhook
    api = await start_api(http={"rejected-token-webhook": url})
    items = [{"app_id": APP, "token": DEAD, "type": "message"}]
    status, data, _ = await api.post("/v1/push", {"notifications": items})
    assert status == 200
    assert data["results"][0]["status"] == "token-rejected"
    async with asyncio.timeout(10):
        event = await got.get()
    assert event == {
        "event": "token-rejected",
        "provider": "apns",
        "app_id": APP,
        "service": "remote",
        "token": DEAD,
        "reason": "Unregistered",
    }


VOIP_TOKEN = "c3" * 32


async def test_non_call_pushes_never_go_to_a_pushkit_token(api: Api, sim: ApnsSimulator) -> None:
    # A PushKit token belongs to the bundle's .voip topic: an alert sent to it with the
    # bundle topic gets DeviceTokenNotForTopic, and the valid token would be dropped.
    sim.set_tokens(topics={VOIP_TOKEN: APP + ".voip"})
    param = f"{sim.team_id}.{APP}.voip"
    items = [
        {"app_id": APP + ".voip", "token": VOIP_TOKEN, "type": "message", "text": "hi"},
        {"app_id": APP + ".voip", "token": VOIP_TOKEN, "type": "background"},
        {"provider": "apns", "param": param, "prid": VOIP_TOKEN, "type": "cancel"},
        {"provider": "apns", "param": param, "prid": VOIP_TOKEN, "type": "message"},
        # voip&remote: a message goes to the remote token, a call to the PushKit one
        {"provider": "apns", "param": f"{param}&remote",
         "prid": f"{VOIP_TOKEN}:voip&{TOKEN}:remote", "type": "message"},
        {"app_id": APP + ".voip", "token": VOIP_TOKEN, "type": "call"},
    ]  # fmt: skip
    status, data, _ = await api.post("/v1/push", {"notifications": items})
    assert status == 200
    results = data["results"]
    assert [r["status"] for r in results] == ["failed"] * 4 + ["sent", "sent"]
    for r in results[:4]:
        assert r["reason"].startswith("invalid: type: ")
        assert "PushKit" in r["reason"]
    assert data["summary"]["token-rejected"] == 0
    sent = [(p.token, p.push_type) for p in sim.received]
    assert sorted(sent) == sorted([(TOKEN, "alert"), (VOIP_TOKEN, "voip")])


async def test_message_alerts_ask_for_mutable_content(api: Api, sim: ApnsSimulator) -> None:
    items = [
        {"app_id": APP, "token": TOKEN, "type": "message", "text": "Maintenance at 22:00"},
        {"app_id": APP, "token": TOKEN, "type": "cancel"},
    ]
    status, data, _ = await api.post("/v1/push", {"notifications": items})
    assert status == 200
    assert [r["status"] for r in data["results"]] == ["sent", "sent"]
    message, cancel = (
        next(p for p in sim.received if p.apns_id == r["id"]) for r in data["results"]
    )
    assert message.payload["aps"]["mutable-content"] == 1  # a service extension shows text
    assert "mutable-content" not in cancel.payload["aps"]


async def test_webpush_item_with_subscription_keys_carries_the_encrypted_text(
    api: Api, sim: ApnsSimulator, tmp_path: Path
) -> None:
    from sipwake.push import ece
    from sipwake.simulator.webpush import WebPushSimulator, write_vapid_key

    web = await WebPushSimulator().start(ssl_context=sim.pki.server_context(("http/1.1",)))
    try:
        public = write_vapid_key(tmp_path / "vapid.pem")
        status, data, _ = await api.post(
            "/v1/push-credentials",
            {"type": "webpush", "private_key": (tmp_path / "vapid.pem").read_text(),
             "subject": "mailto:ops@example.org"},
        )  # fmt: skip
        assert status == 201
        status, _, _ = await api.post(
            "/v1/apps",
            {"name": "Web", "provider": "webpush", "app_ids": ["web-app"],
             "credential_ids": [data["data"]["id"]]},
        )  # fmt: skip
        assert status == 201
        sub = web.subscribe(public)
        keys = sub.to_json()["keys"]
        assert isinstance(keys, dict)
        items = [
            {"app_id": "web-app", "token": sub.endpoint, "type": "message",
             "text": "Maintenance at 22:00", "caller": "sip:ops@example.org", **keys},
            {"app_id": "web-app", "token": sub.endpoint, "type": "message",
             "p256dh": keys["p256dh"]},
            {"app_id": "web-app", "token": sub.endpoint, "type": "message",
             "p256dh": "not base64!", "auth": keys["auth"]},
            {"app_id": APP, "token": TOKEN, "type": "message", **keys},
        ]  # fmt: skip
        status, data, _ = await api.post("/v1/push", {"notifications": items})
        assert status == 200
        results = data["results"]
        assert [r["status"] for r in results] == ["sent", "failed", "failed", "failed"]
        assert results[1]["reason"].startswith("invalid: p256dh: give both")
        assert results[2]["reason"].startswith("invalid: p256dh/auth: ")
        assert results[3]["reason"].startswith("invalid: p256dh: ")
        [got] = web.received
        # Decrypted here with the browser's private key, not through the simulator.
        payload = json.loads(ece.decrypt(got.body, sub.private_key, sub.auth))
        assert payload["type"] == "message"
        assert payload["text"] == "Maintenance at 22:00"
        assert payload["from-uri"] == "sip:ops@example.org"
    finally:
        await web.aclose()
