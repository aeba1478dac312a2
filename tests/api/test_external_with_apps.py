"""``[push.external] uri`` replaces the server-wide providers only: an app with its own
credentials keeps pushing through them (docs/providers.md, External pusher)."""

from __future__ import annotations

from aiohttp import web

from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest
from sipwake.simulator.apns import ApnsSimulator
from tests.api.conftest import APP, TOKEN, StartApi


async def test_app_credentials_win_over_the_external_pusher(
    start_api: StartApi, sim: ApnsSimulator
) -> None:
    received: list[dict[str, str]] = []

    async def pusher(request: web.Request) -> web.Response:
        received.append(dict(request.query))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/ext", pusher)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        uri = f"http://127.0.0.1:{port}/ext?type=$type&token=$token&app=$app-id"
        api = await start_api(push={"external": {"uri": uri, "method": "POST", "protocol": "http"}})
        service = api.server.push
        assert service is not None
        # The configured app (its own APNs key): its provider, the APNs simulator.
        mine = Destination(Provider.APNS, APP, TOKEN)
        result = await service.send(PushRequest(mine, PushKind.MESSAGE, call_id="c-app"))
        assert result.outcome is Outcome.SENT, result
        assert [p.token for p in sim.received] == [TOKEN]
        assert received == []
        # A device of no configured app: the external pusher, not APNs.
        other = Destination(Provider.FCM, "some-project", "fcm-token-1")
        result = await service.send(PushRequest(other, PushKind.MESSAGE, call_id="c-ext"))
        assert result.outcome is Outcome.SENT, result
        assert received == [{"type": "fcm", "token": "fcm-token-1", "app": "some-project"}]
        assert [p.token for p in sim.received] == [TOKEN]
    finally:
        await runner.cleanup()
