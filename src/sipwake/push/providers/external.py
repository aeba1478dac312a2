"""The generic external pusher (``[push.external]``), as Flexisip's generic push.

Every push becomes one HTTP request to a URL template in which ``$type $token $app-id
$from-name $from-uri $from-tag $to-uri $call-id $event $sound $msgid $uid`` are replaced,
URL-escaped, at every occurrence. POST sends the message text as ``text/plain``. Any 2xx
is success. When configured it takes every push, ahead of the native providers, so
:meth:`ExternalProvider.accepts` says yes to every destination.

``$from-name`` and ``$from-uri`` are empty unless the request sets ``display_from_uri``
(``[push] display-from-uri``), as on APNs, FCM and Web Push: the caller's identity leaves
the server only when the operator allows it, whichever provider carries the push.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import quote, urlsplit

from sipwake.config import Config
from sipwake.push.providers.fcm import loc_key
from sipwake.push.providers.transport import (
    HttpTransport,
    InFlight,
    TransportError,
    make_transport,
    ssl_context,
)
from sipwake.push.request import Destination, Outcome, PushKind, PushRequest, PushResult

log = logging.getLogger(__name__)

VARIABLES = (
    "type",
    "token",
    "app-id",
    "from-name",
    "from-uri",
    "from-tag",
    "to-uri",
    "call-id",
    "event",
    "sound",
    "msgid",
    "uid",
)
# Longest names first so "$from-name" never matches as "$from" + "-name".
_PATTERN = re.compile(
    r"\$(" + "|".join(re.escape(v) for v in sorted(VARIABLES, key=len, reverse=True)) + r")"
)


def variables(request: PushRequest) -> dict[str, str]:
    """The value of each template variable for one push."""
    dest = request.destination
    is_call = request.kind in (PushKind.CALL, PushKind.RINGING, PushKind.CALL_ENDED)
    sound = request.strings.call_sound if is_call else request.strings.message_sound
    from_uri, display_name = request.shown_caller()
    return {
        "type": str(dest.provider),
        "token": dest.token,
        "app-id": dest.app_id,
        "from-name": display_name,
        "from-uri": from_uri,
        "from-tag": "",
        "to-uri": "",
        "call-id": request.call_id,
        "event": "call" if is_call else str(request.kind),
        "sound": sound if request.kind is not PushKind.BACKGROUND else "",
        "msgid": loc_key(request),
        "uid": request.uuid,
    }


def expand(template: str, values: dict[str, str]) -> str:
    """Replace every ``$name`` of the template with its URL-escaped value."""
    return _PATTERN.sub(lambda m: quote(values.get(m.group(1), ""), safe=""), template)


def check_template(template: str) -> None:
    """Refuse a template that cannot give an http(s) URL (at configuration time)."""
    parts = urlsplit(template)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"[push.external] uri: expected an http:// or https:// URL: {template!r}")


class ExternalProvider:
    """Sends each push as a GET or POST to the operator's own pusher."""

    name = "external"

    def __init__(
        self,
        template: str,
        *,
        method: str = "GET",
        protocol: str = "http2",
        transport: HttpTransport | None = None,
    ) -> None:
        check_template(template)
        if method not in ("GET", "POST"):
            raise ValueError(f"[push.external] method: expected GET or POST, got {method!r}")
        self.template = template
        self.method = method
        self._transport = transport or make_transport(protocol)
        self._inflight = InFlight()

    def accepts(self, destination: Destination) -> bool:
        return True

    def build(self, request: PushRequest) -> tuple[str, list[tuple[str, str]], bytes]:
        url = expand(self.template, variables(request))
        if self.method == "GET":
            return url, [], b""
        return url, [("content-type", "text/plain; charset=utf-8")], request.text.encode()

    async def send(self, request: PushRequest) -> PushResult:
        self._inflight.enter()
        try:
            return await self._send(request)
        finally:
            self._inflight.leave()

    async def _send(self, request: PushRequest) -> PushResult:
        url, headers, body = self.build(request)
        try:
            resp = await self._transport.request(self.method, url, headers, body)
        except TransportError as exc:
            return PushResult(Outcome.FAILED, str(exc))
        prefix = request.destination.token_prefix()
        if 200 <= resp.status < 300:
            log.debug("external push for %s: %s", prefix, resp.status)
            return PushResult(Outcome.SENT, status=resp.status)
        log.info("external push for %s refused: %s", prefix, resp.status)
        text = resp.body[:200].decode("utf-8", "replace").strip()
        return PushResult(
            Outcome.FAILED,
            f"external pusher answered {resp.status} {text}".strip(),
            status=resp.status,
        )

    async def aclose(self) -> None:
        """Let pushes under way finish, then close the connections."""
        await self._inflight.wait_idle()
        await self._transport.aclose()


def build_external_provider(
    config: Config, *, ca_file: str | None = None
) -> ExternalProvider | None:
    """The external pusher of ``[push.external]``, or None when ``uri`` is empty.

    When it is built it must be the only provider: it takes precedence over the native
    ones, as in Flexisip.
    """
    ext = config.external
    if not ext.uri:
        return None
    ca = ca_file
    if ca is None and config.push.ca_file:
        ca = str(config.resolve_path(config.push.ca_file))
    transport = make_transport(ext.protocol, ssl_context=ssl_context(ca))
    return ExternalProvider(ext.uri, method=ext.method, protocol=ext.protocol, transport=transport)
