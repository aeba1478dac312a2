"""``sipwake simulate`` serves FCM, Web Push and the external receiver next to APNs."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp

from sipwake.config import load_config
from sipwake.push import jws
from sipwake.push.providers.external import ExternalProvider
from sipwake.push.providers.fcm import build_fcm_provider
from sipwake.push.providers.webpush import build_webpush_provider, keys_from_b64
from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest
from tests.simulator.test_simulate_cli import simulate, wait_state


async def admin(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with http.request(method, url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_simulate_serves_fcm_webpush_and_external(tmp_path: Path) -> None:
    state_dir = tmp_path / "sim"
    proc = simulate("--state-dir", str(state_dir), "--quiet")
    try:
        state = wait_state(state_dir, proc)
        fcm, webpush, external = state["fcm"], state["webpush"], state["external"]
        assert os.stat(fcm["service_account"]).st_mode & 0o077 == 0
        assert os.stat(webpush["vapid_private_key"]).st_size > 0
        config_file = tmp_path / "sipwake.toml"
        config_file.write_text(
            f'[push]\nca-file = "{state["ca_file"]}"\n'
            f'[push.firebase]\nserver = "{fcm["url"]}"\n'
            f'service-accounts = {{ "{fcm["project"]}" = "{fcm["service_account"]}" }}\n'
            f'[push.webpush]\nvapid-private-key = "{webpush["vapid_private_key"]}"\n'
            'vapid-subject = "mailto:ops@example.org"\n'
        )
        config = load_config(config_file)
        base = state["admin_url"]
        async with aiohttp.ClientSession() as http:
            # FCM HTTP v1 over HTTP/2 + TLS, token from the simulator's token endpoint.
            provider = build_fcm_provider(config)
            assert provider is not None
            await admin(http, "POST", f"{base}/fcm/tokens", {"unregistered": ["gone"]})
            sent = await provider.send(
                PushRequest(Destination(Provider.FCM, fcm["project"], "tok-1"), PushKind.CALL)
            )
            gone = await provider.send(
                PushRequest(Destination(Provider.FCM, fcm["project"], "gone"), PushKind.CALL)
            )
            await provider.aclose()
            assert sent.ok and gone.outcome is Outcome.TOKEN_REJECTED
            messages = await admin(http, "GET", f"{base}/fcm/messages")
            assert [m["token"] for m in messages["v1"]] == ["tok-1"]

            # Web Push with an encrypted payload, to a subscription bound to our VAPID key.
            sub = await admin(
                http,
                "POST",
                f"{base}/webpush/subscriptions",
                {"application_server_key": webpush["vapid_public_key"]},
            )
            keys = keys_from_b64(sub["keys"]["p256dh"], sub["keys"]["auth"])
            wp = build_webpush_provider(config, subscription_keys={sub["endpoint"]: keys})
            assert wp is not None
            result = await wp.send(
                PushRequest(
                    Destination(Provider.WEBPUSH, "", sub["endpoint"]),
                    PushKind.MESSAGE,
                    call_id="m-1",
                )
            )
            await wp.aclose()
            assert result.status == 201
            [push] = await admin(http, "GET", f"{base}/webpush/pushes")
            assert json.loads(push["payload"])["call-id"] == "m-1"
            assert len(jws.b64url_decode(sub["private_key"])) == 32

            # The external receiver over both protocols.
            for url, protocol in ((external["url"], "http"), (external["h2c_url"], "http2")):
                ext = ExternalProvider(url + "/p?t=$token", method="POST", protocol=protocol)
                request = PushRequest(
                    Destination(Provider.FCM, "app", "tk"), PushKind.MESSAGE, text="hello"
                )
                assert (await ext.send(request)).ok
                await ext.aclose()
            got = await admin(http, "GET", f"{base}/external/requests")
            assert [(r["http_version"], r["query"]["t"], r["body"]) for r in got] == [
                ("1.1", ["tk"], "hello"),
                ("2", ["tk"], "hello"),
            ]
            async with http.post(f"{base}/fcm/faults", json={"status": 418}) as resp:
                assert resp.status == 400 and "status" in (await resp.json())["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
