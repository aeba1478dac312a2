"""The HTTP API: /pnm2 (Acrobits), /v1 (native, credentials, apps), /health, /metrics and
/openapi.json, served by :class:`ApiServer` on the small HTTP/1.1 server of ``httpd``.

Handlers only translate HTTP to and from provider-neutral :class:`PushRequest` objects;
the push service and the app registry do the rest. Every error leaves as JSON: the
Acrobits shape (``{"code", "response"}``) under /pnm2, ``{"errors": [...]}`` elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from sipwake.api.httpd import HttpServer, Request, Response
from sipwake.clock import Clock, SystemClock
from sipwake.config import HttpSection

log = logging.getLogger("sipwake.api")

#: Reads the SIP side's counters (name → value) for /metrics, when SIP runs.
SipCounters = Callable[[], Mapping[str, float]]
Handler = Callable[[Request], Awaitable[Response]]


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
    limiter: Any = None  # sipwake.api.auth.RateLimiter when [http] rate-limit is set
    ready: Callable[[], bool] = lambda: True


_JSON_HEADERS = {"Content-Type": "application/json"}


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response serialised with orjson (several times faster than json)."""
    all_headers = _JSON_HEADERS if headers is None else {**_JSON_HEADERS, **headers}
    return Response(orjson.dumps(data), status, all_headers)


def api_error(
    status: int, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The error body of /v1 and the operational endpoints (JSON:API-like, as Telnyx)."""
    body = {"errors": [{"code": str(status), "title": title, "detail": detail}]}
    return json_response(body, status, headers)


def pnm2_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An Acrobits-shaped error with the same code in the HTTP status."""
    return json_response({"code": status, "response": message}, status, headers)


def error_for(
    path: str, status: int, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The right error shape for the path (Acrobits under /pnm2, JSON:API-like elsewhere)."""
    if path == "/pnm2" or path.startswith("/pnm2/"):
        return pnm2_error(status, detail, headers)
    return api_error(status, title, detail, headers)


class Router:
    """Exact paths, and paths ending in one ``{id}`` segment."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Handler]] = {}
        self.with_id: dict[str, dict[str, Handler]] = {}  # prefix ending in "/" -> methods

    def add(self, method: str, path: str, handler: Handler) -> None:
        if path.endswith("/{id}"):
            self.with_id.setdefault(path[: -len("{id}")], {})[method] = handler
        else:
            self.exact.setdefault(path, {})[method] = handler

    def match(self, path: str) -> tuple[str, dict[str, Handler], str | None] | None:
        """(route name, handlers by method, id) for ``path``, or None."""
        methods = self.exact.get(path)
        if methods is not None:
            return path, methods, None
        prefix, _, ident = path.rpartition("/")
        methods = self.with_id.get(prefix + "/")
        if methods is not None and ident:
            return prefix + "/{id}", methods, ident
        return None


async def health(request: Request) -> Response:
    """200 once every listener is up; load balancers and tests wait on it."""
    ready = request.ctx.ready()
    return json_response({"status": "ok" if ready else "starting"}, 200 if ready else 503)


def unauthenticated_warning(addresses: list[str], api_keys: list[str]) -> str | None:
    """The start-up warning when /v1 is open to other hosts without an API key, else None."""
    if api_keys:
        return None
    exposed = []
    for address in addresses:
        try:
            loopback = ipaddress.ip_address(address.partition("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            exposed.append(address)
    if not exposed:
        return None
    return (
        f"[http] api-keys is empty and the HTTP API listens on {', '.join(exposed)} "
        "(not loopback): /v1 (pushes, credentials, apps) is unauthenticated; "
        "set [http] api-keys or listen on 127.0.0.1"
    )


class ApiServer:
    """The API's routes, guard (keys, rate limit) and error handling on an HttpServer."""

    def __init__(self, context: ApiContext) -> None:
        from sipwake.api import auth, credentials, metrics, native, openapi, pnm2

        self.context = context
        self.router = Router()
        self.router.add("GET", "/health", health)
        pnm2.add_routes(self.router)
        native.add_routes(self.router)
        credentials.add_routes(self.router)
        self.router.add("GET", "/metrics", metrics.handle)
        self.router.add("GET", "/openapi.json", openapi.handle)
        http = context.http
        self.guard = auth.Guard(context) if http.api_keys or http.rate_limit else None
        self.http = HttpServer(self.dispatch, error_for, max_body_size=http.max_body_size)

    async def dispatch(self, request: Request) -> Response:
        request.ctx = self.context
        path = request.path
        found = self.router.match(path)
        if found is None:
            response = error_for(path, 404, "Not Found", f"no such endpoint: {path}")
            self._count("other", response.status)
            return response
        route, methods, ident = found
        method = request.method
        handler = methods.get(method) or methods.get("*")
        if handler is None and method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allow = ", ".join(sorted(methods))
            response = error_for(
                path, 405, "Method Not Allowed", f"method {method} not allowed on {path}",
                {"Allow": allow},
            )  # fmt: skip
        else:
            if ident is not None:
                request.match_info["id"] = ident
            refused = self.guard.check(request) if self.guard is not None else None
            if refused is not None:
                response = refused
            else:
                try:
                    response = await handler(request)
                except Exception:
                    log.exception("unexpected error in %s %s", method, path)
                    response = error_for(path, 500, "Internal Server Error", "internal error")
        self._count(route, response.status)
        return response

    def _count(self, route: str, status: int) -> None:
        counts = self.context.http_counts
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        bound = await self.http.start(host, port)
        warning = unauthenticated_warning(self.http.addresses(), self.context.http.api_keys)
        if warning:
            log.warning("%s", warning)
        return bound

    async def close(self) -> None:
        await self.http.close()
