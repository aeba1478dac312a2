"""RFC 8599 push parameters of a Contact, turned into push destinations.

A device registers with ``pn-provider``/``pn-param``/``pn-prid`` (RFC 8599), with the iOS 13
extension Flexisip and Linphone use (``pn-param=TEAMID.bundle.voip&remote`` and
``pn-prid=VOIPTOKEN:voip&REMOTETOKEN:remote``), or with the legacy Linphone parameters
(``pn-type``, ``pn-tok``, ``app-id``). All forms end up as one :class:`Destination` per
service, so nothing past this module knows which form the device used.

Every malformed input raises :class:`PushParamsError`, whose message starts with the
parameter's name, because the registrar puts that message in a SIP 400 reason phrase.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from sipwake.push.request import AlertStrings, CallEndReason, Destination, Provider, Service
from sipwake.sip.uri import ALNUM, char_table, made_of


class PushParamsError(ValueError):
    """Push parameters that cannot be used; the message names the parameter and the problem."""


@dataclass(frozen=True, slots=True)
class PushParams:
    """What a Contact's push parameters say about its device.

    ``destinations`` holds one entry per service (``voip`` and/or ``remote`` on iOS, one
    ``remote`` entry elsewhere); it is empty for a contact without push parameters and for
    a capability query (RFC 8599 §5.2: ``pn-provider`` without ``pn-prid``, the device asks
    whether the server supports that provider).
    """

    destinations: tuple[Destination, ...] = ()
    provider: Provider | None = None
    capability_query: bool = False
    strings: AlertStrings = field(default_factory=AlertStrings)
    timeout: int | None = None  # pn-timeout: seconds to wait before the push
    call_remote_push_interval: int | None = None  # pn-call-remote-push-interval
    # Per-device texts of the final call alert (pn-missing-call-str, ...), when given.
    end_strings: Mapping[CallEndReason, str] = field(default_factory=dict)
    # pn-silent: 0 asks for a push that rings the phone, so the router sends the caller
    # 180 Ringing once the call push went out (as older Flexisip releases did); 1, what
    # Linphone sends by default, and absence (None) give the caller no 180 for the push.
    silent: bool | None = None

    @property
    def has_push(self) -> bool:
        """True when the device can be reached by a push."""
        return bool(self.destinations)

    def for_service(self, service: Service) -> Destination | None:
        """The destination of one service (``voip`` or ``remote``), if the device has it."""
        for dest in self.destinations:
            if dest.service is service:
                return dest
        return None


_PROVIDERS = {p.value: p for p in Provider}
_SERVICES = {s.value: s for s in Service}
# A bundle id: dot-separated components of letters, digits and hyphens.
_BUNDLE_RE = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
# An Apple team id is 10 upper-case alphanumerics; Linphone writes the 8-character
# placeholder ABCD1234 when the app does not know its team. Reverse-DNS bundle ids never
# start with an all-upper-case component, so such a first component is taken as the team.
_TEAM_RE = re.compile(r"[A-Z0-9]{8,10}")
# APNs device tokens are hexadecimal (either case); they go into a URL path
# (/3/device/<token>), where "." or ".." would change the path.
# Tokens are checked against bytes.translate tables (a few instructions a character; the
# regexes [0-9A-Fa-f]+ and so on cost several times that on 64-character tokens).
_APNS_TOKEN_CHARS = char_table("0123456789ABCDEFabcdef")
_FCM_PROJECT_CHARS = char_table(ALNUM + "_.-")
_FCM_TOKEN_CHARS = char_table(ALNUM + "_.:-")


_END_STRING_PARAMS = {
    "pn-missing-call-str": CallEndReason.MISSED,
    "pn-call-accepted-elsewhere-str": CallEndReason.ANSWERED_ELSEWHERE,
    "pn-call-declined-elsewhere-str": CallEndReason.DECLINED_ELSEWHERE,
}


def parse_push_params(params: Mapping[str, str | None]) -> PushParams:
    """Read a Contact's parameters (URI or header parameters; names are case-insensitive).

    Values may be percent-encoded (URI parameters) or quoted (header parameters). RFC 8599
    parameters win over legacy ones when a contact carries both, as in Flexisip. Only the
    push parameters are read (``pn-*`` and the legacy ``app-id``); others are not looked at.
    """
    p, optional = _normalise(params)
    if not p:
        return _NO_PUSH
    if optional:  # per-device alert texts, timers, flags: rare, read only when present
        strings = _alert_strings(p)
        timeout = _seconds(p, "pn-timeout")
        interval = _seconds(p, "pn-call-remote-push-interval")
        silent = _flag(p, "pn-silent")
        end_strings = {r: v for name, r in _END_STRING_PARAMS.items() if (v := p.get(name))}
    else:
        strings, timeout, interval, silent, end_strings = _DEFAULT_STRINGS, None, None, None, {}

    def result(
        dests: tuple[Destination, ...] = (),
        provider: Provider | None = None,
        query: bool = False,
    ) -> PushParams:
        return PushParams(dests, provider, query, strings, timeout, interval, end_strings, silent)

    if "pn-provider" in p:
        provider = _provider(p["pn-provider"])
        if "pn-prid" not in p:
            # RFC 8599 §5.2: the device only asks whether the provider is supported.
            if "pn-param" in p and provider.value.startswith("apns"):
                _apple_param(p["pn-param"])
            return result(provider=provider, query=True)
        dests = _rfc8599(provider, p.get("pn-param"), p["pn-prid"])
        return result(dests, provider)

    if "pn-type" in p or "pn-tok" in p:
        dests = _legacy(p)
        return result(dests, dests[0].provider)

    for name in ("pn-prid", "pn-param"):
        if name in p:
            raise PushParamsError(f"pn-provider: missing ({name} given without a provider)")
    return result()


#: The parameters that name the device's provider, app and tokens; any other push
#: parameter is optional (alert texts, timers, flags).
_CORE_PARAMS = frozenset({"pn-provider", "pn-param", "pn-prid", "pn-type", "pn-tok", "app-id"})
_HEX = frozenset("0123456789abcdefABCDEF")


def _normalise(params: Mapping[str, str | None]) -> tuple[dict[str, str | None], bool]:
    """The push parameters (``pn-*``, ``app-id``) with lower-case names, header-parameter
    strings unquoted and URI percent-escapes decoded, in one pass; and whether any of them
    is optional (not in :data:`_CORE_PARAMS`)."""
    out: dict[str, str | None] = {}
    optional = False
    for name, value in params.items():
        key = name.strip().lower()
        if not key.startswith("pn-") and key != "app-id":
            continue
        if key not in _CORE_PARAMS:
            optional = True
        if value is not None:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            if "%" in value:
                value = _unquote(key, value)
        out[key] = value
    return out, optional


def _unquote(key: str, value: str) -> str:
    """Decode percent-escapes (RFC 3986: ``%`` and two hex digits; UTF-8 beyond ASCII)."""
    head, *pieces = value.split("%")
    out = [head]
    for piece in pieces:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            raise PushParamsError(f"{key}: invalid percent-encoding")
        code = int(piece[:2], 16)
        if code >= 0x80:  # a multi-byte UTF-8 character: decode the whole value as bytes
            try:
                return urllib.parse.unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise PushParamsError(f"{key}: invalid percent-encoding (not UTF-8)") from None
        out.append(chr(code))
        out.append(piece[2:])
    return "".join(out)


def _required(p: Mapping[str, str | None], name: str, what: str) -> str:
    value = p.get(name)
    if value is None and name not in p:
        raise PushParamsError(f"{name}: missing ({what})")
    if not value:
        raise PushParamsError(f"{name}: empty value ({what})")
    return value


def _provider(value: str | None) -> Provider:
    if not value:
        raise PushParamsError("pn-provider: empty value")
    provider = _PROVIDERS.get(value.lower())
    if provider is None:
        supported = ", ".join(_PROVIDERS)
        raise PushParamsError(
            f"pn-provider: unsupported provider {value!r} (supported: {supported})"
        )
    return provider


def _seconds(p: Mapping[str, str | None], name: str) -> int | None:
    if name not in p:
        return None
    value = p[name]
    if value is None or not value.isascii() or not value.isdigit():
        raise PushParamsError(f"{name}: expected a number of seconds, got {value!r}")
    return int(value)


_FLAG_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _flag(p: Mapping[str, str | None], name: str) -> bool | None:
    if name not in p:
        return None
    value = p[name]
    if value is None:  # a parameter without a value is a set flag
        return True
    flag = _FLAG_VALUES.get(value.lower())
    if flag is None:
        raise PushParamsError(f"{name}: expected 0 or 1, got {value!r}")
    return flag


def _alert_strings(p: Mapping[str, str | None]) -> AlertStrings:
    """Per-device alert keys and sounds; an absent or empty parameter keeps the default."""
    names = {
        "pn-call-str": "call_loc_key",
        "pn-msg-str": "message_loc_key",
        "pn-groupchat-str": "groupchat_loc_key",
        "pn-call-snd": "call_sound",
        "pn-msg-snd": "message_sound",
    }
    overrides: dict[str, str] = {attr: v for name, attr in names.items() if (v := p.get(name))}
    return AlertStrings(**overrides) if overrides else _DEFAULT_STRINGS


_DEFAULT_STRINGS = AlertStrings()  # frozen: one instance serves every contact
_NO_PUSH = PushParams()  # a contact without push parameters (frozen, shared)


@functools.lru_cache(maxsize=256)  # the pusher parses one pn-param for many tokens
def _apple_param(param: str | None) -> tuple[str | None, str, tuple[Service, ...]]:
    """Split an APNs ``pn-param`` into (team id, bundle id, services).

    Forms: ``TEAMID.bundle.voip&remote``, ``TEAMID.bundle.voip``, ``TEAMID.bundle`` (no
    service suffix means ``remote``) and plain RFC 8599 ``bundle.voip`` / ``bundle``.
    """
    if param is None:
        raise PushParamsError("pn-param: missing (the APNs topic, e.g. TEAMID.org.example.app)")
    if not param:
        raise PushParamsError("pn-param: empty value (the APNs topic)")
    head, sep, last = param.rpartition(".")
    services: list[Service] = []
    if sep and last and all(s in ("voip", "remote") for s in last.split("&")):
        for name in last.split("&"):
            service = _SERVICES[name]
            if service in services:
                raise PushParamsError(f"pn-param: service {name!r} repeated")
            services.append(service)
        topic = head
    elif "&" in param:
        raise PushParamsError(
            f"pn-param: unknown service in {last!r} (expected voip, remote or voip&remote)"
        )
    else:
        services = [Service.REMOTE]
        topic = param
    team_id: str | None = None
    first, dot, rest = topic.partition(".")
    if dot and _TEAM_RE.fullmatch(first):
        team_id, topic = first, rest
    if not topic or not _BUNDLE_RE.fullmatch(topic):
        raise PushParamsError(f"pn-param: invalid bundle id {topic!r}")
    return team_id, topic, tuple(services)


def _rfc8599(provider: Provider, param: str | None, prid: str | None) -> tuple[Destination, ...]:
    if not prid:
        raise PushParamsError("pn-prid: empty value (the device token)")
    if provider in (Provider.APNS, Provider.APNS_DEV):
        return _apple(provider, param, prid)
    if provider is Provider.FCM:
        if not param:
            raise PushParamsError(
                "pn-param: missing (the Firebase project id or number is required for fcm)"
            )
        if not made_of(param, _FCM_PROJECT_CHARS):
            raise PushParamsError(f"pn-param: invalid Firebase project {param!r}")
        if not made_of(prid, _FCM_TOKEN_CHARS):
            raise PushParamsError("pn-prid: invalid FCM registration token")
        return (Destination(provider, param, prid),)
    # Web Push: the subscription URI is the token (pn-param, the VAPID key, is optional).
    url = urllib.parse.urlsplit(prid)
    if url.scheme.lower() != "https" or not url.hostname:
        raise PushParamsError("pn-prid: Web Push subscription must be an https:// URI")
    return (Destination(provider, "", prid),)


def _apple(provider: Provider, param: str | None, prid: str) -> tuple[Destination, ...]:
    team_id, bundle, services = _apple_param(param)
    tokens = prid.split("&")
    if len(tokens) != len(services):
        declared = "&".join(services)
        raise PushParamsError(
            f"pn-prid: {len(tokens)} token{'s' if len(tokens) != 1 else ''} for "
            f"{len(services)} service{'s' if len(services) != 1 else ''} in pn-param "
            f"({declared})"
        )
    by_service: dict[Service, str] = {}
    for item in tokens:
        token, colon, name = item.partition(":")
        if not colon:
            if len(tokens) > 1:
                raise PushParamsError(
                    f"pn-prid: token without a :voip or :remote suffix among {len(tokens)} tokens"
                )
            service = services[0]
        elif name in _SERVICES:
            service = _SERVICES[name]
        else:
            raise PushParamsError(f"pn-prid: unknown service {name!r} (expected voip or remote)")
        if service not in services:
            raise PushParamsError(
                f"pn-prid: token for service {service.value!r} but pn-param declares "
                f"{'&'.join(services)}"
            )
        if service in by_service:
            raise PushParamsError(f"pn-prid: two tokens for service {service.value!r}")
        if not token:
            raise PushParamsError(f"pn-prid: empty token for service {service.value!r}")
        if not made_of(token, _APNS_TOKEN_CHARS):
            raise PushParamsError(
                f"pn-prid: invalid APNs token for service {service.value!r} "
                "(expected hexadecimal digits)"
            )
        by_service[service] = token
    return tuple(
        Destination(provider, bundle, by_service[s], service=s, team_id=team_id) for s in services
    )


def _legacy(p: Mapping[str, str | None]) -> tuple[Destination, ...]:
    """Linphone's pre-RFC 8599 parameters: pn-type, pn-tok, app-id."""
    kind = _required(p, "pn-type", "apple, android, firebase or google, given with pn-tok")
    token = _required(p, "pn-tok", "the device token, given with pn-type")
    kind = kind.lower()
    if kind == "apple":
        app_id = _required(p, "app-id", "the bundle id ending in .prod or .dev")
        bundle, dot, env = app_id.rpartition(".")
        if not dot or env not in ("prod", "dev"):
            raise PushParamsError(f"app-id: {app_id!r} does not end in .prod or .dev")
        provider = Provider.APNS_DEV if env == "dev" else Provider.APNS
        service = Service.REMOTE
        if bundle.endswith(".voip"):
            bundle, service = bundle[: -len(".voip")], Service.VOIP
        if not bundle or not _BUNDLE_RE.fullmatch(bundle):
            raise PushParamsError(f"app-id: invalid bundle id {bundle!r}")
        if not made_of(token, _APNS_TOKEN_CHARS):
            raise PushParamsError("pn-tok: invalid APNs token (expected hexadecimal digits)")
        return (Destination(provider, bundle, token, service=service),)
    if kind in ("android", "firebase", "google"):
        project = _required(p, "app-id", f"the Firebase project for pn-type={kind}")
        if not made_of(project, _FCM_PROJECT_CHARS):
            raise PushParamsError(f"app-id: invalid Firebase project {project!r}")
        if not made_of(token, _FCM_TOKEN_CHARS):
            raise PushParamsError("pn-tok: invalid FCM registration token")
        return (Destination(Provider.FCM, project, token),)
    raise PushParamsError(
        f"pn-type: unsupported type {kind!r} (supported: apple, android, firebase, google)"
    )
