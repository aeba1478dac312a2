"""The HTTP API application (aiohttp): health now; /pnm2, /v1 and /metrics join it."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

HEALTH_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("health")


async def health(request: web.Request) -> web.Response:
    """200 once every listener is up; load balancers and tests wait on it."""
    ready = request.app[HEALTH_KEY]()
    status = 200 if ready else 503
    return web.json_response({"status": "ok" if ready else "starting"}, status=status)


def make_app(ready: Callable[[], bool]) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[HEALTH_KEY] = ready
    app.router.add_get("/health", health)
    return app
