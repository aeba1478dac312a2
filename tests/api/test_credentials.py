"""Push credentials and apps: upload, use without restart, delete; secrets never shown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sipwake.simulator.apns import ApnsSimulator

from .conftest import OTHER, TOKEN, Api, StartApi

TEXT = {"verb": "NotifyTextMessage", "Selector": "s", "DeviceToken": TOKEN}


def pem_body(pem: bytes) -> str:
    """A line from the middle of a PEM block: what a leaked secret would contain."""
    lines = [ln for ln in pem.decode().splitlines() if ln and not ln.startswith("-----")]
    return lines[len(lines) // 2]


def split_pem(path: Path) -> tuple[str, str]:
    text = path.read_text()
    cert_end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return text[:cert_end] + "\n", text[cert_end:].lstrip()


def stored_bytes(api: Api) -> bytes:
    return b"".join(p.read_bytes() for p in api.config.data_dir.rglob("*") if p.is_file())


def service_account(project: str = "proj-1") -> dict[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "k1",
        "private_key": pem,
        "client_email": f"push@{project}.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


async def test_token_credential_lifecycle(api: Api, sim: ApnsSimulator) -> None:
    key_pem = sim.key_file.read_bytes()
    # An app whose AppIds nothing knows yet: refused.
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "AppId": OTHER})
    assert data["code"] == 400 and "unknown AppId" in data["response"]

    status, data, _ = await api.post(
        "/v1/push-credentials",
        {"type": "ios-token", "alias": "other-prod", "private_key": key_pem.decode(),
         "key_id": sim.key_id, "team_id": sim.team_id},
    )  # fmt: skip
    assert status == 201, data
    cred = data["data"]
    assert (cred["type"], cred["alias"], cred["key_id"]) == ("ios-token", "other-prod", sim.key_id)
    assert "private_key" not in cred and "secret" not in cred

    status, data, _ = await api.post(
        "/v1/apps",
        {"name": "Other", "provider": "apns", "app_ids": [OTHER, OTHER + ".voip"],
         "credential_ids": [cred["id"]]},
    )  # fmt: skip
    assert status == 201, data
    app = data["data"]

    # Used at once, without a restart, for both AppIds.
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "AppId": OTHER})
    assert data == {"code": 200, "response": "Your message was sent."}
    status, data, _ = await api.post(
        "/pnm2/send", {**TEXT, "verb": "NotifyIncomingCall", "AppId": OTHER + ".voip"}
    )
    assert data["code"] == 200
    assert [(p.topic, p.auth) for p in sim.received] == [
        (OTHER, "token"),
        (OTHER + ".voip", "token"),
    ]

    # Never returned, never stored in clear.
    for path in ("/v1/push-credentials", f"/v1/push-credentials/{cred['id']}", "/v1/apps"):
        status, data, _ = await api.request("GET", path)
        assert status == 200
        assert pem_body(key_pem) not in json.dumps(data)
    assert pem_body(key_pem).encode() not in stored_bytes(api)

    # A used credential cannot go; the app can, and then the AppId is unknown again.
    status, data, _ = await api.request("DELETE", f"/v1/push-credentials/{cred['id']}")
    assert status == 409 and "used by" in data["errors"][0]["detail"]
    status, data, _ = await api.request("DELETE", f"/v1/apps/{app['id']}")
    assert status == 200
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "AppId": OTHER})
    assert data["code"] == 400
    status, data, _ = await api.request("DELETE", f"/v1/push-credentials/{cred['id']}")
    assert status == 200 and data["data"]["id"] == cred["id"]
    status, data, _ = await api.request("GET", f"/v1/push-credentials/{cred['id']}")
    assert status == 404 and data["errors"][0]["code"] == "404"


async def test_certificate_credential_attached_later(api: Api, sim: ApnsSimulator) -> None:
    cert, key = split_pem(sim.client_cert_file(OTHER))
    status, data, _ = await api.post(
        "/v1/push-credentials", {"type": "ios", "certificate": cert, "private_key": key}
    )
    assert status == 201, data
    cred = data["data"]
    assert cred["bundle_id"] == OTHER  # read from the certificate's UID
    assert cred["cert_expires_at"] > 0 and "UID=" in cred["cert_subject"].upper()
    status, data, _ = await api.post(
        "/v1/apps", {"name": "O", "provider": "apns", "app_ids": [OTHER]}
    )
    assert status == 201
    app_id = data["data"]["id"]
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "AppId": OTHER})
    assert data["code"] == 500  # no credential attached yet: nothing can sign
    status, data, _ = await api.request(
        "PATCH", f"/v1/apps/{app_id}", json={"credential_ids": [cred["id"]]}
    )
    assert status == 200 and data["data"]["credential_ids"] == [cred["id"]]
    status, data, _ = await api.post("/pnm2/send", {**TEXT, "AppId": OTHER})
    assert data["code"] == 200
    assert sim.received[-1].auth == "certificate"
    assert pem_body(key.encode()).encode() not in stored_bytes(api)


async def test_bad_secrets_are_400_saying_why(api: Api, sim: ApnsSimulator) -> None:
    cert, key = split_pem(sim.client_cert_file(OTHER))
    other_key = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    rsa_pem = service_account()["private_key"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "ios-token", "private_key": "-----BEGIN PRIVATE KEY-----\nxx\n", "key_id": "K",
          "team_id": "T"}, "private_key: not an unencrypted PEM private key"),
        ({"type": "ios-token", "private_key": rsa_pem, "key_id": "K", "team_id": "T"}, "P-256"),
        ({"type": "ios-token", "private_key": other_key, "team_id": "T"}, "key_id: missing"),
        ({"type": "ios", "certificate": "nope", "private_key": key}, "certificate: not a PEM"),
        ({"type": "ios", "certificate": cert, "private_key": other_key}, "does not match"),
        ({"type": "android", "project_account_json_file": "{not json"}, "not JSON"),
        ({"type": "android", "project_account_json_file": {"type": "service_account"}},
         "missing or empty project_id"),
        ({"type": "webpush", "private_key": other_key, "subject": "bob"}, "subject"),
        ({"type": "telepathy"}, "type: expected one of"),
    ]  # fmt: skip
    for body, needle in cases:
        status, data, _ = await api.post("/v1/push-credentials", body)
        assert status == 400, body
        assert needle in data["errors"][0]["detail"], (needle, data)
    status, data, _ = await api.request("GET", "/v1/push-credentials")
    assert data["meta"]["total_results"] == 0


async def test_listing_filters_and_pages(api: Api) -> None:
    created = []
    for i in range(3):
        status, data, _ = await api.post(
            "/v1/push-credentials",
            {"type": "android", "alias": f"a{i % 2}",
             "project_account_json_file": service_account(f"proj-{i}")},
        )  # fmt: skip
        assert status == 201, data
        assert data["data"]["project_id"] == f"proj-{i}"
        created.append(data["data"]["id"])
    webpush_key = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    status, data, _ = await api.post(
        "/v1/push-credentials",
        {"type": "webpush", "private_key": webpush_key, "subject": "mailto:ops@example.org"},
    )
    assert status == 201
    status, data, _ = await api.request(
        "GET", "/v1/push-credentials", params={"filter[type]": "android", "page[size]": "2"}
    )
    assert [c["id"] for c in data["data"]] == created[:2]
    assert data["meta"] == {"page_number": 1, "page_size": 2, "total_pages": 2, "total_results": 3}
    status, data, _ = await api.request(
        "GET", "/v1/push-credentials",
        params={"filter[type]": "android", "page[size]": "2", "page[number]": "2"},
    )  # fmt: skip
    assert [c["id"] for c in data["data"]] == created[2:]
    status, data, _ = await api.request(
        "GET", "/v1/push-credentials", params={"filter[alias]": "a1"}
    )
    assert [c["id"] for c in data["data"]] == [created[1]]
    status, data, _ = await api.request("GET", "/v1/push-credentials", params={"page[size]": "0"})
    assert status == 400


async def test_apps_are_checked(api: Api) -> None:
    status, data, _ = await api.post(
        "/v1/push-credentials",
        {"type": "android", "project_account_json_file": service_account()},
    )
    android = data["data"]["id"]
    bad = [
        ({"name": "x", "provider": "apns", "app_ids": ["a"], "credential_ids": [android]}, 400,
         "android credential"),
        ({"name": "x", "provider": "pager", "app_ids": ["a"]}, 400, "provider"),
        ({"name": "x", "provider": "fcm", "app_ids": []}, 400, "app_ids"),
        ({"name": "x", "provider": "fcm", "app_ids": ["a"], "credential_ids": ["nope"]}, 400,
         "not found"),
        ({"name": "x", "provider": "apns", "app_ids": ["org.example.app"]}, 409, "configured"),
    ]  # fmt: skip
    for body, code, needle in bad:
        status, data, _ = await api.post("/v1/apps", body)
        assert status == code, body
        assert needle in data["errors"][0]["detail"]
    status, data, _ = await api.post(
        "/v1/apps", {"name": "A", "provider": "fcm", "app_ids": ["a"], "credential_ids": [android]}
    )
    assert status == 201
    status, data, _ = await api.post("/v1/apps", {"name": "B", "provider": "fcm", "app_ids": ["a"]})
    assert status == 409 and "already belongs" in data["errors"][0]["detail"]
    status, data, _ = await api.request("GET", "/v1/apps", params={"filter[provider]": "fcm"})
    assert data["meta"]["total_results"] == 1 and data["data"][0]["name"] == "A"
    status, data, _ = await api.request("GET", "/v1/apps/unknown")
    assert status == 404


async def test_android_credential_pushes_through_fcm(
    start_api: StartApi, sim: ApnsSimulator
) -> None:
    from sipwake.simulator.fcm import FcmSimulator

    fcm = await FcmSimulator().start(pki=sim.pki, http2=True)
    try:
        api = await start_api(push={"firebase": {"server": fcm.h2_url}})
        account = fcm.create_service_account("proj-android")
        status, data, _ = await api.post(
            "/v1/push-credentials",
            {"type": "android", "alias": "droid", "project_account_json_file": account},
        )
        assert status == 201 and data["data"]["project_id"] == "proj-android"
        assert account["private_key"].splitlines()[5] not in json.dumps(data)
        status, data, _ = await api.post(
            "/v1/apps",
            {"name": "Droid", "provider": "fcm", "app_ids": ["com.example.droid"],
             "credential_ids": [data["data"]["id"]]},
        )  # fmt: skip
        assert status == 201
        call = {"verb": "NotifyIncomingCall", "AppId": "com.example.droid", "Selector": "s",
                "DeviceToken": "fcm-token-0001", "CallId": "c-7"}  # fmt: skip
        status, data, _ = await api.post("/pnm2/send", call)
        assert data == {"code": 200, "response": "Your message was sent."}
        [message] = fcm.messages
        assert (message["project"], message["token"]) == ("proj-android", "fcm-token-0001")
        assert message["android"]["priority"] == "high"
        assert message["android"]["data"]["call-id"] == "c-7"
        assert json.loads(message["android"]["data"]["custom-payload"])["Selector"] == "s"
        fcm.unregistered.add("fcm-token-dead")
        status, data, _ = await api.post("/pnm2/send", {**call, "DeviceToken": "fcm-token-dead"})
        assert data["code"] == 404
    finally:
        await fcm.aclose()


async def test_webpush_credential_pushes_to_the_subscription(
    api: Api, sim: ApnsSimulator, tmp_path: Path
) -> None:
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
        status, data, _ = await api.post(
            "/v1/apps",
            {"name": "Web", "provider": "webpush", "app_ids": ["web-app"],
             "credential_ids": [data["data"]["id"]]},
        )  # fmt: skip
        assert status == 201
        sub = web.subscribe(public)
        body = {"verb": "NotifyGenericTextMessage", "AppId": "web-app", "Message": "hi",
                "DeviceToken": sub.endpoint}  # fmt: skip
        status, data, _ = await api.post("/pnm2/send", body)
        assert data == {"code": 200, "response": "Your message was sent."}
        [push] = web.received
        assert push.vapid_subject == "mailto:ops@example.org"
        web.unsubscribe(sub)
        status, data, _ = await api.post("/pnm2/send", body)
        assert data["code"] == 404
    finally:
        await web.aclose()
