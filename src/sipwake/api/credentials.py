"""Push credentials and apps, shaped like Telnyx's push-credential API.

``/v1/push-credentials``: upload (secrets checked first, a bad PEM or JSON is a 400 that
says why), list with ``filter[type]``, ``filter[alias]``, ``page[number]``, ``page[size]``,
get and delete. ``/v1/apps``: create an app (its provider, AppIds and credentials), list,
get, update (attach credentials) and delete. Secrets are never returned; the store keeps
them encrypted; every change reloads the app registry, so it is used at once.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from sipwake.api.app import ApiContext, Router, api_error, json_response
from sipwake.api.httpd import Request, Response
from sipwake.push.apps import CREDENTIAL_TYPES_FOR, CredentialError, validate_credential
from sipwake.push.request import Provider
from sipwake.store.base import NotFound, StoreConflict, StoreError
from sipwake.store.model import App, Credential

MAX_PAGE_SIZE = 250


def _ctx(request: Request) -> ApiContext:
    ctx: ApiContext = request.ctx
    return ctx


def _bad(detail: str) -> Response:
    return api_error(400, "Bad Request", detail)


def _not_found(what: str, ident: str) -> Response:
    return api_error(404, "Not Found", f"{what} {ident} not found")


def _no_store() -> Response:
    return api_error(503, "Service Unavailable", "no store is configured")


async def _body(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
    if request.content_type != "application/json":
        return None, _bad("Content-Type must be application/json")
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return None, _bad(f"invalid JSON: {exc}")
    if not isinstance(data, dict):
        return None, _bad("expected a JSON object")
    return data, None


def _paging(request: Request) -> tuple[int, int] | Response:
    q = request.query
    try:
        number = int(q.get("page[number]", "1"))
        size = int(q.get("page[size]", "20"))
    except ValueError:
        return _bad("page[number] and page[size] must be integers")
    if number < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        return _bad(f"page[number] must be >= 1 and page[size] 1..{MAX_PAGE_SIZE}")
    return number, size


def _meta(total: int, number: int, size: int) -> dict[str, int]:
    return {
        "page_number": number,
        "page_size": size,
        "total_pages": max(1, math.ceil(total / size)),
        "total_results": total,
    }


def credential_json(cred: Credential) -> dict[str, Any]:
    """A credential as the API shows it: public fields only, never the secret."""
    return {**cred.public(), "record_type": "push_credential"}


def app_json(app: App) -> dict[str, Any]:
    return {
        "id": app.id,
        "name": app.name,
        "provider": app.provider,
        "app_ids": list(app.app_ids),
        "credential_ids": list(app.credential_ids),
        "created_at": app.created_at,
        "updated_at": app.updated_at,
        "record_type": "push_app",
    }


# --- credentials ------------------------------------------------------------------------------


async def create_credential(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    data, error = await _body(request)
    if error is not None:
        return error
    assert data is not None
    try:
        cred = validate_credential(data)
    except CredentialError as exc:
        return _bad(str(exc))
    try:
        stored = await ctx.store.credentials.add(cred)
    except (ValueError, StoreError) as exc:
        return _bad(str(exc))
    return json_response({"data": credential_json(stored)}, 201)


async def list_credentials(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    paging = _paging(request)
    if isinstance(paging, Response):
        return paging
    number, size = paging
    ctype = request.query.get("filter[type]")
    alias = request.query.get("filter[alias]")
    page = await ctx.store.credentials.list(
        type=ctype, alias=alias, offset=(number - 1) * size, limit=size
    )
    return json_response(
        {
            "data": [credential_json(c) for c in page.items],
            "meta": _meta(page.total, number, size),
        }
    )


async def get_credential(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    cid = request.match_info["id"]
    cred = await ctx.store.credentials.get(cid)
    if cred is None:
        return _not_found("push credential", cid)
    return json_response({"data": credential_json(cred)})


async def delete_credential(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    cid = request.match_info["id"]
    cred = await ctx.store.credentials.get(cid)
    if cred is None:
        return _not_found("push credential", cid)
    try:
        await ctx.store.credentials.delete(cid)
    except StoreConflict as exc:
        return api_error(409, "Conflict", f"{exc}; detach it from the app(s) first")
    await ctx.registry.reload()
    return json_response({"data": credential_json(cred)})


# --- apps ---------------------------------------------------------------------------------------


def _str_list(data: dict[str, Any], key: str) -> list[str] | Response:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return _bad(f"{key}: expected a list of non-empty strings")
    return list(value)


async def _check_app(ctx: ApiContext, app: App) -> Response | None:
    """Provider known, credentials of a matching type, AppIds not taken by the config."""
    try:
        provider = Provider(app.provider)
    except ValueError:
        return _bad("provider: expected apns, apns.dev, fcm or webpush")
    if not app.name:
        return _bad("name: missing")
    if not app.app_ids:
        return _bad("app_ids: an app needs at least one AppId")
    for ident in app.app_ids:
        owner = ctx.registry.find(ident)
        if owner is not None and owner.key.startswith("config:"):
            return api_error(
                409, "Conflict", f'AppId {ident} is configured in the file ([apps."{owner.name}"])'
            )
    allowed = CREDENTIAL_TYPES_FOR[provider]
    for cid in app.credential_ids:
        cred = await ctx.store.credentials.get(cid)
        if cred is None:
            return _bad(f"credential_ids: push credential {cid} not found")
        if cred.type not in allowed:
            return _bad(
                f"credential_ids: {cid} is a {cred.type} credential; {provider.value} apps "
                f"take {' or '.join(allowed)}"
            )
    return None


async def create_app(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    data, error = await _body(request)
    if error is not None:
        return error
    assert data is not None
    name, provider = data.get("name", ""), data.get("provider", "")
    if not isinstance(name, str) or not isinstance(provider, str):
        return _bad("name and provider must be strings")
    app_ids = _str_list(data, "app_ids")
    if isinstance(app_ids, Response):
        return app_ids
    cred_ids = _str_list(data, "credential_ids")
    if isinstance(cred_ids, Response):
        return cred_ids
    app = App(name=name, provider=provider, app_ids=app_ids, credential_ids=cred_ids)
    problem = await _check_app(ctx, app)
    if problem is not None:
        return problem
    try:
        stored = await ctx.store.apps.add(app)
    except StoreConflict as exc:
        return api_error(409, "Conflict", str(exc))
    except (ValueError, StoreError) as exc:
        return _bad(str(exc))
    await ctx.registry.reload()
    return json_response({"data": app_json(stored)}, 201)


async def list_apps(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    paging = _paging(request)
    if isinstance(paging, Response):
        return paging
    number, size = paging
    page = await ctx.store.apps.list(
        provider=request.query.get("filter[provider]"),
        name=request.query.get("filter[name]"),
        offset=(number - 1) * size,
        limit=size,
    )
    return json_response(
        {"data": [app_json(a) for a in page.items], "meta": _meta(page.total, number, size)}
    )


async def get_app(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    aid = request.match_info["id"]
    app = await ctx.store.apps.get(aid)
    if app is None:
        return _not_found("app", aid)
    return json_response({"data": app_json(app)})


async def update_app(request: Request) -> Response:
    """Change an app's name, AppIds or credentials (attach or detach them)."""
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    aid = request.match_info["id"]
    app = await ctx.store.apps.get(aid)
    if app is None:
        return _not_found("app", aid)
    data, error = await _body(request)
    if error is not None:
        return error
    assert data is not None
    if "name" in data:
        if not isinstance(data["name"], str):
            return _bad("name: expected a string")
        app.name = data["name"]
    for key in ("app_ids", "credential_ids"):
        if key in data:
            values = _str_list(data, key)
            if isinstance(values, Response):
                return values
            setattr(app, key, values)
    if "provider" in data and data["provider"] != app.provider:
        return _bad("provider: cannot be changed; create another app")
    problem = await _check_app(ctx, app)
    if problem is not None:
        return problem
    try:
        stored = await ctx.store.apps.update(app)
    except StoreConflict as exc:
        return api_error(409, "Conflict", str(exc))
    except NotFound:
        return _not_found("app", aid)
    except (ValueError, StoreError) as exc:
        return _bad(str(exc))
    await ctx.registry.reload()
    return json_response({"data": app_json(stored)})


async def delete_app(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.store is None:
        return _no_store()
    aid = request.match_info["id"]
    app = await ctx.store.apps.get(aid)
    if app is None:
        return _not_found("app", aid)
    await ctx.store.apps.delete(aid)
    await ctx.registry.reload()
    return json_response({"data": app_json(app)})


def add_routes(router: Router) -> None:
    router.add("POST", "/v1/push-credentials", create_credential)
    router.add("GET", "/v1/push-credentials", list_credentials)
    router.add("GET", "/v1/push-credentials/{id}", get_credential)
    router.add("DELETE", "/v1/push-credentials/{id}", delete_credential)
    router.add("POST", "/v1/apps", create_app)
    router.add("GET", "/v1/apps", list_apps)
    router.add("GET", "/v1/apps/{id}", get_app)
    router.add("PATCH", "/v1/apps/{id}", update_app)
    router.add("DELETE", "/v1/apps/{id}", delete_app)
