"""The simulator's admin endpoint: plain HTTP/1.1 JSON on 127.0.0.1.

Cross-process tests and users' staging read what the simulated providers received and
change token lists and faults at runtime. Each provider adds its routes under its own
prefix (``/apns/...`` now; ``/fcm/...`` and others later). Bad input gets 400 with a JSON
``{"error": ...}`` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from sipwake.simulator.apns import ApnsSimulator

Json = dict[str, Any]


class BadRequest(Exception):
    """The request body is wrong; the message names the field."""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_object(request: web.Request) -> Json:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _check_keys(data: Json, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _str_list(data: Json, key: str) -> list[str]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{key!r} must be a list of token strings")
    return value


def _int(data: Json, key: str, *, minimum: int = 0) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"{key!r} must be an integer >= {minimum}")
    return value


def _seconds(data: Json, key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{key!r} must be a number of seconds >= 0")
    return float(value)


Handler = Callable[[web.Request], Any]


def _guard(handler: Callable[[web.Request], Any]) -> Handler:
    """Turn BadRequest and ValueError into 400 JSON answers."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        return resp

    return wrapped


def add_apns_routes(app: web.Application, sim: ApnsSimulator) -> None:
    """``/apns/pushes``, ``/apns/tokens``, ``/apns/faults``."""

    async def get_pushes(request: web.Request) -> web.Response:
        records = [p.to_json() for p in sim.received]
        for field in ("token", "environment", "topic", "push_type"):
            want = request.query.get(field)
            if want is not None:
                records = [r for r in records if str(r[field]).lower() == want.lower()]
        limit = request.query.get("limit")
        if limit is not None:
            if not limit.isdigit():
                raise BadRequest("'limit' must be a non-negative integer")
            records = records[-int(limit) :] if int(limit) else []
        return web.json_response(records)

    async def delete_pushes(request: web.Request) -> web.Response:
        n = len(sim.received)
        sim.clear_received()
        return web.json_response({"deleted": n})

    token_keys = {
        "unregistered",
        "expired",
        "bad",
        "development",
        "dev",
        "production",
        "prod",
        "topics",
        "replace",
    }

    async def post_tokens(request: web.Request) -> web.Response:
        data = await _json_object(request)
        _check_keys(data, token_keys)
        topics = data.get("topics", {})
        if not isinstance(topics, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in topics.items()
        ):
            raise BadRequest("'topics' must map token strings to topic strings")
        replace = data.get("replace", False)
        if not isinstance(replace, bool):
            raise BadRequest("'replace' must be true or false")
        sim.set_tokens(
            unregistered=_str_list(data, "unregistered"),
            expired=_str_list(data, "expired"),
            bad=_str_list(data, "bad"),
            development=_str_list(data, "development") + _str_list(data, "dev"),
            production=_str_list(data, "production") + _str_list(data, "prod"),
            topics=topics,
            replace=replace,
        )
        return await get_tokens(request)

    async def get_tokens(request: web.Request) -> web.Response:
        reg = sim.rules.tokens
        return web.json_response(
            {
                "unregistered": sorted(reg.unregistered),
                "expired": sorted(reg.expired),
                "bad": sorted(reg.bad),
                "development": sorted(t for t, e in reg.environment.items() if e.short == "dev"),
                "production": sorted(t for t, e in reg.environment.items() if e.short == "prod"),
                "topics": dict(sorted(reg.topics.items())),
            }
        )

    async def delete_tokens(request: web.Request) -> web.Response:
        sim.set_tokens(replace=True)
        return await get_tokens(request)

    fault_keys = {
        "fail_first",
        "fail_status",
        "retry_after",
        "goaway_after",
        "delay",
        "idle_timeout",
        "token_limit",
        "token_window",
    }

    async def post_faults(request: web.Request) -> web.Response:
        data = await _json_object(request)
        _check_keys(data, fault_keys)
        sim.set_faults(
            fail_first=_int(data, "fail_first"),
            fail_status=_int(data, "fail_status"),
            retry_after=_int(data, "retry_after"),
            goaway_after=_int(data, "goaway_after"),
            delay=_seconds(data, "delay"),
            idle_timeout=_seconds(data, "idle_timeout"),
            token_limit=_int(data, "token_limit"),
            token_window=_seconds(data, "token_window"),
        )
        return await get_faults(request)

    async def get_faults(request: web.Request) -> web.Response:
        f = sim.faults
        return web.json_response(
            {
                "fail_first": f.fail_first,
                "fail_status": f.fail_status,
                "retry_after": f.retry_after,
                "goaway_after": f.goaway_after,
                "delay": f.delay,
                "idle_timeout": f.idle_timeout,
                "token_limit": f.token_limit,
                "token_window": f.token_window,
                "failed_so_far": sim.rules.failed_so_far,
            }
        )

    async def delete_faults(request: web.Request) -> web.Response:
        sim.clear_faults()
        return await get_faults(request)

    app.router.add_get("/apns/pushes", _guard(get_pushes))
    app.router.add_delete("/apns/pushes", _guard(delete_pushes))
    app.router.add_get("/apns/tokens", _guard(get_tokens))
    app.router.add_post("/apns/tokens", _guard(post_tokens))
    app.router.add_delete("/apns/tokens", _guard(delete_tokens))
    app.router.add_get("/apns/faults", _guard(get_faults))
    app.router.add_post("/apns/faults", _guard(post_faults))
    app.router.add_delete("/apns/faults", _guard(delete_faults))


class AdminServer:
    """The aiohttp application and its listener; ``state`` is served at ``/state``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.app = web.Application()
        self.state: Json = {}
        self._runner: web.AppRunner | None = None
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/state", self._state)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await self.stop()
            raise
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
