"""The Acrobits-compatible push gateway: ``/pnm2/send``, ``/pnm2/multisend``, ``/pnm2``.

A well-formed request is answered HTTP 200 with ``{"code": C, "response": "..."}`` where C
is 200 (sent), 400 (a field is missing or wrong), 404 (the provider rejected the token:
drop it) or 500 (the provider failed). A request that is not a JSON POST is HTTP 400. The
legacy form API (``POST /pnm2``, url-encoded fields) answers with C as the HTTP status.

Verbs → push kinds: ``NotifyTextMessage`` and ``NotifyGenericTextMessage`` → message
(an alert), ``NotifyReprovision`` → background (silent), ``NotifyIncomingCall`` → call
(PushKit / high-priority data); to the remote token of an iOS app it becomes a ringing
alert, since only a PushKit token can take a VoIP push. The Acrobits fields travel to the
app in the push's custom payload.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson

from sipwake.api.app import ApiContext, Router, json_response, pnm2_error
from sipwake.api.httpd import Request, Response
from sipwake.push.apps import AppError
from sipwake.push.request import (
    AlertStrings,
    Outcome,
    Provider,
    PushKind,
    PushRequest,
)

SENT = "Your message was sent."
#: Largest /pnm2/multisend list; bigger batches are split by the caller.
MAX_BATCH = 1000

VERBS: dict[str, PushKind] = {
    "NotifyTextMessage": PushKind.MESSAGE,
    "NotifyGenericTextMessage": PushKind.MESSAGE,
    "NotifyReprovision": PushKind.BACKGROUND,
    "NotifyIncomingCall": PushKind.CALL,
}
#: Fields every verb but NotifyGenericTextMessage needs (Acrobits: the account selector).
NEEDS_SELECTOR = frozenset({"NotifyTextMessage", "NotifyReprovision", "NotifyIncomingCall"})
STRING_FIELDS = (
    "verb",
    "AppId",
    "DeviceToken",
    "Selector",
    "Message",
    "Sound",
    "UserName",
    "UserDisplayName",
    "ContentType",
    "Id",
    "ThreadId",
    "CallId",
)
#: Fields passed to the app in the custom payload, as the Acrobits apps read them.
PAYLOAD_FIELDS = (
    "verb",
    "Selector",
    "Message",
    "Badge",
    "Sound",
    "UserName",
    "UserDisplayName",
    "ContentType",
    "Id",
    "ThreadId",
    "CallId",
)
#: Time-to-live of pushes sent through /pnm2 (seconds); calls are useless after a minute.
TTL = {PushKind.CALL: 60, PushKind.RINGING: 60}
DEFAULT_TTL = 24 * 3600
DEFAULT_STRINGS = AlertStrings()


def reply(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "response": message}


class _Invalid(Exception):
    pass


def _fields(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in STRING_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # numeric ids and selectors are common
        if not isinstance(value, str):
            raise _Invalid(f"{name}: expected a string")
        out[name] = value
    badge = obj.get("Badge")
    if badge is not None:
        if isinstance(badge, str):
            text = badge.strip()
            # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
            if text.isascii() and text.isdigit():
                badge = int(text)
        if isinstance(badge, bool) or not isinstance(badge, int) or badge < 0:
            raise _Invalid("Badge: expected a non-negative integer")
        out["Badge"] = badge
    return out


def build_request(ctx: ApiContext, obj: dict[str, Any]) -> PushRequest:
    """The push of one Acrobits request object; :class:`_Invalid` says what is wrong."""
    f = _fields(obj)
    for name in ("verb", "AppId", "DeviceToken"):
        if not f.get(name):
            raise _Invalid(f"{name}: missing (verb, AppId and DeviceToken are required)")
    verb = f["verb"]
    kind = VERBS.get(verb)
    if kind is None:
        raise _Invalid(f"verb: unknown verb {verb!r}; expected one of {', '.join(VERBS)}")
    if verb in NEEDS_SELECTOR and not f.get("Selector"):
        raise _Invalid(f"Selector: missing (required for {verb})")
    if verb == "NotifyGenericTextMessage" and not f.get("Message"):
        raise _Invalid("Message: missing (required for NotifyGenericTextMessage)")
    app_id = f["AppId"]
    app = ctx.registry.find(app_id)
    if app is None:
        raise _Invalid(f"AppId: unknown AppId {app_id!r} (configure it or create it in /v1/apps)")
    try:
        dest = app.destination(app_id, f["DeviceToken"])
    except AppError as exc:
        raise _Invalid(str(exc)) from None
    is_apple = app.provider in (Provider.APNS, Provider.APNS_DEV)
    if is_apple and kind is PushKind.CALL and not app.is_voip_id(app_id):
        kind = PushKind.RINGING  # a remote token: an alert that rings
    elif is_apple and app.is_voip_id(app_id) and kind is not PushKind.CALL:
        raise _Invalid(
            f"AppId: {app_id} names a PushKit token, which takes only NotifyIncomingCall; "
            "send other verbs to the app's remote-notification AppId"
        )
    custom = {name: f[name] for name in PAYLOAD_FIELDS if name in f}
    badge = f.get("Badge")
    sound = f.get("Sound")
    strings = AlertStrings(message_sound=sound, call_sound=sound) if sound else DEFAULT_STRINGS
    caller_shown = bool(f.get("UserName") or f.get("UserDisplayName"))
    push_id = f.get("Id", "")
    request = PushRequest(
        destination=dest,
        kind=kind,
        call_id=f.get("CallId", ""),
        from_uri=f.get("UserName", ""),
        display_name=f.get("UserDisplayName", ""),
        text=f.get("Message", ""),
        ttl=TTL.get(kind, DEFAULT_TTL),
        custom_payload=custom,
        strings=strings,
        mutable_content=kind is PushKind.MESSAGE and is_apple,
        no_badge=badge == 0,
        display_from_uri=caller_shown,
        # ThreadId groups a chat (aps.thread-id); it is no collapse id: a later message
        # would replace the earlier ones an offline device has not seen.
        thread_id=str(f.get("ThreadId") or ""),
    )
    if push_id and _is_uuid(push_id):
        request.uuid = push_id
    return request


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def send_one(ctx: ApiContext, obj: Any) -> dict[str, Any]:
    """Send one Acrobits request object and describe the outcome."""
    if not isinstance(obj, dict):
        return reply(400, "expected a JSON object with verb, AppId and DeviceToken")
    try:
        request = build_request(ctx, obj)
    except _Invalid as exc:
        return reply(400, str(exc))
    result = await ctx.push.send(request)
    provider = request.destination.provider.value
    if result.outcome is Outcome.SENT:
        return reply(200, SENT)
    if result.outcome is Outcome.TOKEN_REJECTED:
        return reply(404, f"DeviceToken rejected by {provider}: {result.reason or 'unregistered'}")
    return reply(500, f"{provider} failed to send the push: {result.reason or 'unknown error'}")


async def _json_body(request: Request) -> tuple[Any, Response | None]:
    if request.method != "POST":
        return None, pnm2_error(400, f"only POST is accepted, not {request.method}")
    if request.content_type != "application/json":
        return None, pnm2_error(
            400, f"Content-Type must be application/json, not {request.content_type or 'none'}"
        )
    body = await request.read()
    try:
        return orjson.loads(body), None
    except orjson.JSONDecodeError as exc:
        return None, pnm2_error(400, f"invalid JSON: {exc}")


async def handle_send(request: Request) -> Response:
    obj, error = await _json_body(request)
    if error is not None:
        return error
    if not isinstance(obj, dict):
        return pnm2_error(400, "expected a JSON object with verb, AppId and DeviceToken")
    return json_response(await send_one(request.ctx, obj))


async def handle_multisend(request: Request) -> Response:
    obj, error = await _json_body(request)
    if error is not None:
        return error
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        return pnm2_error(400, "expected a JSON list of push objects (or one object)")
    if len(obj) > MAX_BATCH:
        return pnm2_error(400, f"too many pushes in one request: {len(obj)} > {MAX_BATCH}")
    ctx = request.ctx
    replies = await asyncio.gather(*(send_one(ctx, item) for item in obj))
    return json_response(list(replies))


async def handle_form(request: Request) -> Response:
    """The legacy form API: url-encoded fields; the reply's code is the HTTP status."""
    if request.method != "POST":
        return pnm2_error(400, f"only POST is accepted, not {request.method}")
    if request.content_type != "application/x-www-form-urlencoded":
        return pnm2_error(
            400,
            "Content-Type must be application/x-www-form-urlencoded, "
            f"not {request.content_type or 'none'}",
        )
    form = await request.post()
    obj = {k: v for k, v in form.items() if isinstance(v, str)}
    result = await send_one(request.ctx, obj)
    return json_response(result, status=result["code"])


def add_routes(router: Router) -> None:
    router.add("*", "/pnm2/send", handle_send)
    router.add("*", "/pnm2/multisend", handle_multisend)
    router.add("*", "/pnm2", handle_form)
