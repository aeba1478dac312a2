"""The HTTP API application (aiohttp): /pnm2 (Acrobits), /v1 (native, credentials, apps),
/health, /metrics and /openapi.json.

Handlers only translate HTTP to and from provider-neutral :class:`PushRequest` objects;
the push service and the app registry do the rest. Every error leaves as JSON: the
Acrobits shape (``{"code", "response"}``) under /pnm2, ``{"errors": [...]}`` elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from sipwake.clock import Clock, SystemClock
from sipwake.config import HttpSection

log = logging.getLogger("sipwake.api")

HEALTH_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("health")
CONTEXT_KEY: web.AppKey[ApiContext] = web.AppKey("context")

#: Reads the SIP side's counters (name → value) for /metrics, when SIP runs.
SipCounters = Callable[[], Mapping[str, float]]


@dataclass
class ApiContext:
    """What the handlers need: the push engine, the app registry, the store, settings."""

    push: Any  # sipwake.push.service.PushService
    registry: Any  # sipwake.push.apps.AppRegistry
    store: Any = None  # sipwake.store.base.Store | None
    http: HttpSection = field(default_factory=HttpSection)
    clock: Clock = field(default_factory=SystemClock)
    sip_counters: SipCounters | None = None
    http_counts: dict[tuple[str, int], int] = field(default_factory=dict)
    limiter: Any = None  # sipwake.api.auth.RateLimiter, set by the guard when limits are on


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


_JSON_HEADERS = {"Content-Type": "application/json"}


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson (several times faster than json)."""
    all_headers = _JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers}
    return web.Response(body=orjson.dumps(data), status=status, headers=all_headers)


def api_error(
    status: int, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The error body of /v1 and the operational endpoints (JSON:API-like, as Telnyx)."""
    body = {"errors": [{"code": str(status), "title": title, "detail": detail}]}
    return json_response(body, status, headers)


def pnm2_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """An Acrobits-shaped error with the same code in the HTTP status."""
    return json_response({"code": status, "response": message}, status, headers)


def error_for(request: web.Request, status: int, title: str, detail: str,
              headers: Mapping[str, str] | None = None) -> web.Response:  # fmt: skip
    """The right error shape for the path (Acrobits under /pnm2, JSON:API-like elsewhere)."""
    if request.path.startswith("/pnm2"):
        return pnm2_error(status, detail, headers)
    return api_error(status, title, detail, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text errors (404, 405, 413 …) and crashes into JSON."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        if exc.status == 413:
            detail = f"request body larger than {request.app[CONTEXT_KEY].http.max_body_size} bytes"
        elif exc.status == 404:
            detail = f"no such endpoint: {request.path}"
        elif exc.status == 405:
            detail = f"method {request.method} not allowed on {request.path}"
        else:
            detail = exc.text or exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        response = error_for(request, exc.status, exc.reason, detail or exc.reason, headers)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        response = error_for(request, 500, "Internal Server Error", "internal error")
    ctx = request.app.get(CONTEXT_KEY)
    if ctx is not None:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "other"
        key = (name, response.status)
        ctx.http_counts[key] = ctx.http_counts.get(key, 0) + 1
    return response


async def health(request: web.Request) -> web.Response:
    """200 once every listener is up; load balancers and tests wait on it."""
    ready = request.app[HEALTH_KEY]()
    status = 200 if ready else 503
    return json_response({"status": "ok" if ready else "starting"}, status=status)


def make_app(ready: Callable[[], bool], context: ApiContext | None = None) -> web.Application:
    """The aiohttp application; without a context it serves /health only."""
    from sipwake.api import auth

    max_body = context.http.max_body_size if context is not None else 1 << 20
    middlewares = [json_errors]
    if context is not None and (context.http.api_keys or context.http.rate_limit):
        middlewares.append(auth.make_guard(context))
    app = web.Application(client_max_size=max_body, middlewares=middlewares)
    app[HEALTH_KEY] = ready
    app.router.add_get("/health", health)
    if context is None:
        return app
    from sipwake.api import credentials, metrics, native, openapi, pnm2

    app[CONTEXT_KEY] = context
    pnm2.add_routes(app)
    native.add_routes(app)
    credentials.add_routes(app)
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_get("/openapi.json", openapi.handle)
    return app
