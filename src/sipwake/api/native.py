"""The native push API: ``POST /v1/push``, a batch of pushes in RFC 8599 vocabulary.

Each item names its device as a SIP contact would (``provider``, ``param``, ``prid``) or by
an ``app_id`` known to the registry plus ``token``, and what to say (``type`` = call,
message, background or cancel, ``caller``, ``caller_name``, ``call_id``, ``text``, ``ttl``,
``custom_payload``; for Web Push the subscription's ``p256dh`` and ``auth`` keys, which
make the push carry its data encrypted). The answer has one result per item, in order:
``sent`` (with the provider's id), ``failed`` (with the reason) or ``token-rejected`` — the
caller should drop that token at once. The whole batch is HTTP 200 unless the body itself
is malformed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from sipwake.api.app import ApiContext, Router, api_error, json_response
from sipwake.api.httpd import Request, Response
from sipwake.push.apps import AppError
from sipwake.push.ece import SubscriptionKeys
from sipwake.push.params import PushParamsError, parse_push_params
from sipwake.push.providers.webpush import WebPushProvider, keys_from_b64
from sipwake.push.request import (
    CallEndReason,
    Destination,
    Provider,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    Service,
)

MAX_BATCH = 1000
TYPES: dict[str, PushKind] = {
    "call": PushKind.CALL,
    "message": PushKind.MESSAGE,
    "background": PushKind.BACKGROUND,
    "cancel": PushKind.CALL_ENDED,
}
STRING_KEYS = ("provider", "param", "prid", "app_id", "token", "type", "caller", "caller_name",
               "call_id", "text", "cancel_reason", "p256dh", "auth")  # fmt: skip
MAX_TTL = 28 * 24 * 3600


class ItemError(ValueError):
    """One item of a batch that cannot be sent; the message names the field."""


def _strings(item: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in STRING_KEYS:
        value = item.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ItemError(f"{key}: expected a string")
        out[key] = value
    return out


def build_request(ctx: ApiContext, item: Any) -> PushRequest:
    """The push of one batch item; :class:`ItemError` says what is wrong."""
    return _build(ctx, item)[0]


def _subscription_keys(s: dict[str, str], dest: Destination) -> SubscriptionKeys | None:
    """The Web Push subscription keys of an item (``p256dh`` and ``auth``), if given."""
    if "p256dh" not in s and "auth" not in s:
        return None
    if dest.provider is not Provider.WEBPUSH:
        raise ItemError("p256dh: subscription keys are for webpush destinations only")
    if not s.get("p256dh") or not s.get("auth"):
        raise ItemError("p256dh: give both p256dh and auth (the subscription's keys)")
    try:
        return keys_from_b64(s["p256dh"], s["auth"])
    except PushError as exc:
        raise ItemError(
            f"p256dh/auth: {str(exc).removeprefix('bad subscription keys: ')}"
        ) from None


def _build(ctx: ApiContext, item: Any) -> tuple[PushRequest, SubscriptionKeys | None]:
    if not isinstance(item, dict):
        raise ItemError("expected a JSON object")
    s = _strings(item)
    kind_name = s.get("type", "")
    kind = TYPES.get(kind_name)
    if kind is None:
        raise ItemError(f"type: expected call, message, background or cancel, got {kind_name!r}")
    service = Service.VOIP if kind is PushKind.CALL else Service.REMOTE
    if "app_id" in s:
        app = ctx.registry.find(s["app_id"])
        if app is None:
            raise ItemError(f"app_id: unknown AppId {s['app_id']!r}")
        if not s.get("token"):
            raise ItemError("token: missing (the device token reported with app_id)")
        try:
            dest = app.destination(s["app_id"], s["token"])
        except AppError as exc:
            raise ItemError(str(exc)) from None
    else:
        if not s.get("provider"):
            raise ItemError("provider: missing (or give app_id and token)")
        if not s.get("prid"):
            raise ItemError("prid: missing (the device token)")
        params = {"pn-provider": s["provider"], "pn-prid": s["prid"]}
        if "param" in s:
            params["pn-param"] = s["param"]
        try:
            parsed = parse_push_params(params)
        except PushParamsError as exc:
            raise ItemError(str(exc).removeprefix("pn-")) from None
        found = parsed.for_service(service)
        if found is None and kind is PushKind.CALL and parsed.destinations:
            found = parsed.for_service(Service.REMOTE)  # no PushKit token: ring with an alert
        if found is None:
            if not parsed.destinations:
                raise ItemError("prid: no device token")
            found = parsed.destinations[0]
        dest = found
    if dest.is_apple and dest.service is Service.VOIP and kind is not PushKind.CALL:
        # Apple refuses an alert to a PushKit token (DeviceTokenNotForTopic), which would
        # get a valid token declared dead.
        raise ItemError(
            f"type: {kind_name} cannot go to a PushKit (VoIP) token, which takes only call; "
            "send it to the app's remote-notification token"
        )
    if kind is PushKind.CALL and dest.is_apple and dest.service is not Service.VOIP:
        kind = PushKind.RINGING
    ttl = item.get("ttl", 60 if kind in (PushKind.CALL, PushKind.RINGING) else 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TTL:
        raise ItemError(f"ttl: expected an integer number of seconds 0..{MAX_TTL}")
    custom = item.get("custom_payload")
    if custom is not None and not isinstance(custom, dict):
        raise ItemError("custom_payload: expected a JSON object")
    end_reason: CallEndReason | None = None
    if kind is PushKind.CALL_ENDED:
        try:
            end_reason = CallEndReason(s.get("cancel_reason", "missed"))
        except ValueError:
            raise ItemError(
                "cancel_reason: expected missed, answered-elsewhere or declined-elsewhere"
            ) from None
    keys = _subscription_keys(s, dest)
    caller, name = s.get("caller", ""), s.get("caller_name", "")
    request = PushRequest(
        destination=dest,
        kind=kind,
        call_id=s.get("call_id", ""),
        from_uri=caller,
        display_name=name,
        text=s.get("text", ""),
        ttl=ttl,
        end_reason=end_reason,
        custom_payload=custom,
        # A notification service extension may rewrite the alert (show the text).
        mutable_content=kind is PushKind.MESSAGE and dest.is_apple,
        display_from_uri=bool(caller or name),
    )
    return request, keys


def describe(result: PushResult) -> dict[str, Any]:
    out: dict[str, Any] = {"status": result.outcome.value}
    if result.provider_id:
        out["id"] = result.provider_id
    if result.reason or not result.ok:
        out["reason"] = result.reason or "unknown error"
    return out


async def _one(ctx: ApiContext, item: Any) -> dict[str, Any]:
    try:
        request, keys = _build(ctx, item)
    except ItemError as exc:
        return {"status": "failed", "reason": f"invalid: {exc}"}
    if keys is not None:
        provider = ctx.push.provider_for(request.destination)
        if not isinstance(provider, WebPushProvider):
            return {"status": "failed", "reason": "no Web Push provider can encrypt this push"}
        # Remembered for the subscription: later pushes to it (SIP ones too) carry data.
        provider.set_subscription_keys(request.destination.token, keys)
    return describe(await ctx.push.send(request))


async def handle_push(request: Request) -> Response:
    if request.content_type != "application/json":
        return api_error(400, "Bad Request", "Content-Type must be application/json")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        return api_error(400, "Bad Request", f"invalid JSON: {exc}")
    if not isinstance(body, dict) or not isinstance(body.get("notifications"), list):
        return api_error(
            400, "Bad Request", 'expected {"notifications": [...]} with a list of pushes'
        )
    items = body["notifications"]
    if len(items) > MAX_BATCH:
        return api_error(400, "Bad Request", f"too many notifications: {len(items)} > {MAX_BATCH}")
    ctx = request.ctx
    results = list(await asyncio.gather(*(_one(ctx, item) for item in items)))
    summary = {"sent": 0, "failed": 0, "token-rejected": 0}
    for r in results:
        summary[r["status"]] += 1
    return json_response({"results": results, "summary": summary})


def add_routes(router: Router) -> None:
    router.add("POST", "/v1/push", handle_push)
