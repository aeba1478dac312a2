"""FCM, Web Push and the external-pusher receiver inside ``sipwake simulate``.

Started next to the APNs simulator with the same CA (TLS for FCM and Web Push), their
credentials written to the state directory and reused on the next start, so a staging
configuration can point at stable paths:

- ``fcm-service-account.json``: a service account the FCM simulator trusts, its
  ``token_uri`` pointing at the simulator (``sipwake push --key``, ``[push.firebase]``);
- ``vapid.pem``: a VAPID key for ``[push.webpush] vapid-private-key``.

Admin routes: ``/fcm/messages``, ``/fcm/tokens``, ``/fcm/faults``, ``/fcm/legacy-keys``,
``/webpush/subscriptions``, ``/webpush/pushes``, ``/external/requests``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipwake.push import ece, jws
from sipwake.simulator.external import ExternalReceiver
from sipwake.simulator.fcm import FcmSimulator
from sipwake.simulator.tls import Pki
from sipwake.simulator.webpush import WebPushSimulator, write_vapid_key

DEFAULT_PROJECT = "sipwake-sim"


@dataclass
class ExtraSimulators:
    state_dir: Path
    host: str = "127.0.0.1"
    fcm_port: int = 0
    webpush_port: int = 0
    external_port: int = 0
    project: str = DEFAULT_PROJECT
    fcm: FcmSimulator = field(default_factory=FcmSimulator)
    webpush: WebPushSimulator = field(default_factory=WebPushSimulator)
    external: ExternalReceiver = field(default_factory=ExternalReceiver)
    external_h2: ExternalReceiver = field(default_factory=ExternalReceiver)
    vapid_public_key: str = ""

    @property
    def service_account_file(self) -> Path:
        return self.state_dir / "fcm-service-account.json"

    @property
    def vapid_file(self) -> Path:
        return self.state_dir / "vapid.pem"

    async def start(self) -> None:
        pki = Pki(self.state_dir)
        pki.ensure()
        await self.fcm.start(self.host, 0, pki=pki, http2=True, h2_port=self.fcm_port)
        if not self.fcm.trust_service_account(self.service_account_file, self.project):
            self.fcm.create_service_account(self.project, self.service_account_file)
        await self.webpush.start(
            self.host, self.webpush_port, ssl_context=pki.server_context(("http/1.1",))
        )
        self.external_h2.received = self.external.received  # one log for both protocols
        await self.external.start(self.host, self.external_port)
        await self.external_h2.start(self.host, 0, http2=True)
        if not self.vapid_file.exists():
            write_vapid_key(self.vapid_file)
        key = serialization.load_pem_private_key(self.vapid_file.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            write_vapid_key(self.vapid_file)
            key = serialization.load_pem_private_key(self.vapid_file.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.vapid_public_key = jws.b64url_encode(ece.public_key_bytes(key.public_key()))

    async def stop(self) -> None:
        for sim in (self.fcm, self.webpush, self.external, self.external_h2):
            await sim.aclose()

    def state(self) -> dict[str, Any]:
        return {
            "fcm": {
                "url": self.fcm.h2_url,
                "http1_url": self.fcm.url,
                "token_uri": self.fcm.token_uri,
                "project": self.project,
                "service_account": str(self.service_account_file),
            },
            "webpush": {
                "url": self.webpush.url,
                "vapid_private_key": str(self.vapid_file),
                "vapid_public_key": self.vapid_public_key,
            },
            "external": {"url": self.external.url, "h2c_url": self.external_h2.url},
        }

    def summary(self) -> str:
        return (
            f"FCM {self.fcm.h2_url} Web Push {self.webpush.url} "
            f"external {self.external.url} (h2c {self.external_h2.url})"
        )


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    return data


def _strings(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key!r} must be a list of token strings")
    return value


def _guard(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return resp

    return wrapped


def _payload_json(payload: bytes | None) -> Any:
    if payload is None:
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(payload).decode()}


def add_extra_routes(app: web.Application, sims: ExtraSimulators) -> None:
    """Admin routes of the FCM, Web Push and external simulators (before the app starts)."""

    async def fcm_messages(request: web.Request) -> web.Response:
        return web.json_response({"v1": sims.fcm.messages, "legacy": sims.fcm.legacy_messages})

    async def fcm_tokens(request: web.Request) -> web.Response:
        data = await _body(request)
        unknown = set(data) - {"unregistered", "invalid"}
        if unknown:
            raise ValueError(
                f"unknown field {sorted(unknown)[0]!r} (allowed: invalid, unregistered)"
            )
        sims.fcm.unregistered.update(_strings(data, "unregistered"))
        sims.fcm.invalid_registration.update(_strings(data, "invalid"))
        return web.json_response(
            {
                "unregistered": sorted(sims.fcm.unregistered),
                "invalid": sorted(sims.fcm.invalid_registration),
            }
        )

    async def fcm_faults(request: web.Request) -> web.Response:
        data = await _body(request)
        count, status = data.get("fail_first", 0), data.get("status", 503)
        retry_after = data.get("retry_after")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("'fail_first' must be an integer >= 0")
        if status not in (401, 429, 500, 503):
            raise ValueError("'status' must be 401, 429, 500 or 503")
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise ValueError("'retry_after' must be an integer >= 0")
        sims.fcm.inject(status, count, None if retry_after is None else str(retry_after))
        return web.json_response({"pending": len(sims.fcm.injected)})

    async def fcm_legacy_key(request: web.Request) -> web.Response:
        data = await _body(request)
        project, key = data.get("project"), data.get("key")
        if not isinstance(project, str) or not project:
            raise ValueError("'project' must be a non-empty string")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError("'key' must be a non-empty string")
        return web.json_response({"project": project, "key": sims.fcm.add_legacy_key(project, key)})

    async def new_subscription(request: web.Request) -> web.Response:
        data = await _body(request)
        key = data.get("application_server_key")
        if key is not None and not isinstance(key, str):
            raise ValueError("'application_server_key' must be a base64url string")
        sub = sims.webpush.subscribe(key)
        scalar = sub.private_key.private_numbers().private_value.to_bytes(32, "big")
        return web.json_response({**sub.to_json(), "private_key": jws.b64url_encode(scalar)})

    async def webpush_pushes(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "subscription": p.subscription,
                    "ttl": p.ttl,
                    "urgency": p.urgency,
                    "vapid_subject": p.vapid_subject,
                    "payload": _payload_json(p.payload),
                }
                for p in sims.webpush.received
            ]
        )

    async def external_requests(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "method": r.method,
                    "path": r.path,
                    "query": r.query,
                    "body": r.body.decode("utf-8", "replace"),
                    "http_version": r.http_version,
                }
                for r in sims.external.received
            ]
        )

    app.router.add_get("/fcm/messages", _guard(fcm_messages))
    app.router.add_post("/fcm/tokens", _guard(fcm_tokens))
    app.router.add_post("/fcm/faults", _guard(fcm_faults))
    app.router.add_post("/fcm/legacy-keys", _guard(fcm_legacy_key))
    app.router.add_post("/webpush/subscriptions", _guard(new_subscription))
    app.router.add_get("/webpush/pushes", _guard(webpush_pushes))
    app.router.add_get("/external/requests", _guard(external_requests))
