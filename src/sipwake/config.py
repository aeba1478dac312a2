"""The configuration: one TOML file, checked against the schema below.

Section and key names follow Flexisip where it has them. The schema is data (dataclass
fields with a ``doc``), so the configuration reference in ``docs/`` is generated from it and
a test fails when the two drift. Unknown sections or keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(Exception):
    """The configuration cannot be honoured; the message names the key and the problem."""


def _key(default: Any, doc: str) -> Any:
    """A configuration key: its default and a one-line meaning for the reference."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ServerSection:
    data_dir: str = _key("./sipwake-data", "Directory for the embedded database and state.")
    log_level: str = _key("info", "One of debug, info, warning, error.")


@dataclass
class SipSection:
    listen: list[str] = _key(
        ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"],
        "SIP listening points: udp://host:port, tcp://host:port, tls://host:port, "
        "ws://host:port, wss://host:port (WebSocket over TLS, for browsers on HTTPS pages).",
    )
    domains: list[str] = _key(
        ["localhost", "127.0.0.1"],
        "Domains this server is responsible for; requests for others are refused.",
    )
    tls_cert: str = _key("", "PEM certificate chain for tls:// and wss:// listeners.")
    tls_key: str = _key("", "PEM private key for tls:// and wss:// listeners.")
    t1: int = _key(500, "Timer T1 in milliseconds: round-trip estimate (RFC 3261 17.1.1.1).")
    t2: int = _key(4000, "Timer T2 in milliseconds: longest non-INVITE retransmit interval.")
    t4: int = _key(5000, "Timer T4 in milliseconds: how long a message may stay in the network.")
    max_message_size: int = _key(65535, "Largest SIP message accepted, in bytes.")
    idle_timeout: int = _key(
        600, "Seconds without traffic after which a TCP/TLS connection is closed; 0 never."
    )
    max_connections: int = _key(10000, "TCP/TLS connections beyond which new ones are refused.")
    max_connections_per_ip: int = _key(
        32, "TCP/TLS connections one source address may hold, so one host cannot take them all."
    )
    advertise: list[str] = _key(
        [],
        "Address shown in Via and Record-Route instead of the bind address: host[:port] for "
        "every listening point, or udp://host[:port] (tcp, tls, ws, wss) for one transport; "
        "required when a listening point binds 0.0.0.0 or ::.",
    )


@dataclass
class AuthSection:
    enabled: bool = _key(False, "Require digest authentication (RFC 3261, RFC 8760).")
    realm: str = _key("", "Digest realm; empty means the first of [sip] domains.")
    users: dict[str, str] = _key({}, "Table of user name to password.")
    algorithms: list[str] = _key(
        ["SHA-256", "MD5"], "Digest algorithms offered, most preferred first (RFC 8760)."
    )


@dataclass
class RegistrarSection:
    max_expires: int = _key(604800, "Largest registration lifetime granted, in seconds.")
    min_expires: int = _key(60, "Shorter registrations are refused with 423.")
    default_expires: int = _key(3600, "Lifetime when the REGISTER names none, in seconds.")
    max_push_devices: int = _key(
        5, "Push-enabled bindings kept per AOR; the oldest is evicted beyond it."
    )


@dataclass
class RouterSection:
    fork_late: bool = _key(True, "Hold calls and messages for devices that register later.")
    call_fork_timeout: int = _key(90, "Seconds a call waits for an answer before 480.")
    message_delivery_timeout: int = _key(
        604800, "Seconds a held MESSAGE is kept for a device that has not registered."
    )
    message_accept_timeout: int = _key(
        5, "Seconds before a MESSAGE to a sleeping device is answered 202 Accepted."
    )
    relay_domains: list[str] = _key(
        [], "Foreign domains requests may be relayed to ('*' any); empty never relays."
    )


@dataclass
class PushSection:
    timeout: int = _key(
        5, "Seconds to wait for an answer before sending the push (0 sends at once)."
    )
    message_time_to_live: int = _key(
        0, "Time-to-live of message pushes in seconds; 0 means message-delivery-timeout."
    )
    max_queue_size: int = _key(100, "Pushes waiting per provider before new ones fail.")
    retransmission_count: int = _key(0, "Times a push is sent again if no device answers.")
    retransmission_interval: int = _key(5, "Seconds between push retransmissions.")
    call_remote_push_interval: int = _key(
        0, "Seconds between ringing alerts to remote-only iOS devices; 0 sends one."
    )
    display_from_uri: bool = _key(False, "Put the caller's URI in display-name.")
    no_badge: bool = _key(False, "Send badge 0 instead of 1.")
    register_wakeup_interval: int = _key(
        0, "Minutes between wake-up pushes to bindings about to expire; 0 disables."
    )
    register_wakeup_threshold: int = _key(
        50, "Percent of a binding's lifetime after which it gets a wake-up push."
    )
    ca_file: str = _key("", "PEM file of CAs that replaces the system store for providers.")
    push_sent_response: str = _key(
        "110 Push sent",
        "Provisional response sent to the caller once a push went out; empty sends none.",
    )


@dataclass
class AppleSection:
    enabled: bool = _key(True, "Send pushes through APNs.")
    certificate_dir: str = _key(
        "", "Directory of <bundle>[.voip].{prod,dev}.pem files (certificate then key)."
    )
    key_file: str = _key("", "APNs token-auth key (.p8).")
    key_id: str = _key("", "Key ID of key-file.")
    team_id: str = _key("", "Apple developer team ID of key-file.")
    server: str = _key("https://api.push.apple.com", "APNs production base URL.")
    dev_server: str = _key(
        "https://api.sandbox.push.apple.com", "APNs development (sandbox) base URL."
    )


@dataclass
class FirebaseSection:
    enabled: bool = _key(True, "Send pushes through Firebase Cloud Messaging.")
    service_accounts: dict[str, str] = _key(
        {}, "Table of Firebase project (id or number) to service-account JSON file."
    )
    projects_api_keys: dict[str, str] = _key(
        {}, "Deprecated legacy API: table of project number to server key."
    )
    token_expiration_anticipation_time: int = _key(
        300, "Seconds before expiry at which an OAuth2 access token is refreshed."
    )
    default_refresh_interval: int = _key(
        60, "Seconds between attempts after a failed access-token refresh."
    )
    server: str = _key("https://fcm.googleapis.com", "FCM base URL.")


@dataclass
class WebPushSection:
    vapid_private_key: str = _key("", "PEM file of the VAPID (RFC 8292) P-256 private key.")
    vapid_subject: str = _key("", "VAPID subject: a mailto: or https: URL.")


@dataclass
class ExternalSection:
    uri: str = _key("", "URL template of an external pusher; when set it sends all pushes.")
    method: str = _key("GET", "GET or POST.")
    protocol: str = _key("http2", "http2 or http (HTTP/1.1).")


@dataclass
class HttpSection:
    listen: str = _key("127.0.0.1:8080", "host:port of the HTTP API; empty disables it.")
    api_keys: list[str] = _key([], "Bearer keys accepted on /v1/*; empty means no check.")
    pnm2_auth: bool = _key(False, "Require the api-keys on /pnm2/* too (Acrobits clients).")
    rate_limit: int = _key(
        0, "Requests per second allowed per API key (per client address without keys); 0 off."
    )
    rate_limit_burst: int = _key(0, "Requests allowed in a burst above rate-limit; 0 = rate-limit.")
    max_body_size: int = _key(1048576, "Largest request body accepted, in bytes (413 above).")
    rejected_token_webhook: str = _key(
        "", "URL that receives a JSON POST for every token a provider rejects; empty none."
    )


@dataclass
class StorageSection:
    url: str = _key(
        "",
        "sqlite:///relative.db, sqlite:////absolute.db or redis://host:port/db; "
        "empty is SQLite under data-dir.",
    )


@dataclass
class AppSection:
    provider: str = _key("", "apns, apns.dev, fcm or webpush.")
    bundle_id: str = _key("", "APNs bundle id (topic without .voip).")
    key_file: str = _key("", "APNs .p8 key.")
    key_id: str = _key("", "APNs key id.")
    team_id: str = _key("", "APNs team id.")
    certificate_file: str = _key("", "APNs certificate and key (PEM).")
    service_account: str = _key("", "FCM service-account JSON file.")
    project: str = _key("", "Firebase project id or number.")
    app_ids: list[str] = _key(
        [], "More AppIds of this app, e.g. an iOS 13 app's PushKit AppId (ending in .voip)."
    )
    vapid_private_key: str = _key("", "Web Push: PEM file of the VAPID P-256 private key.")
    vapid_subject: str = _key("", "Web Push: VAPID subject, a mailto: or https: URL.")


@dataclass
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    sip: SipSection = field(default_factory=SipSection)
    auth: AuthSection = field(default_factory=AuthSection)
    registrar: RegistrarSection = field(default_factory=RegistrarSection)
    router: RouterSection = field(default_factory=RouterSection)
    push: PushSection = field(default_factory=PushSection)
    apple: AppleSection = field(default_factory=AppleSection)
    firebase: FirebaseSection = field(default_factory=FirebaseSection)
    webpush: WebPushSection = field(default_factory=WebPushSection)
    external: ExternalSection = field(default_factory=ExternalSection)
    http: HttpSection = field(default_factory=HttpSection)
    storage: StorageSection = field(default_factory=StorageSection)
    apps: dict[str, AppSection] = field(default_factory=dict)
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        """data-dir, relative to the config file's folder when it is relative."""
        path = Path(self.server.data_dir)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    def resolve_path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(value)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


# TOML section name -> attribute of Config holding that section.
SECTIONS: dict[str, str] = {
    "server": "server",
    "sip": "sip",
    "auth": "auth",
    "registrar": "registrar",
    "router": "router",
    "push": "push",
    "push.apple": "apple",
    "push.firebase": "firebase",
    "push.webpush": "webpush",
    "push.external": "external",
    "http": "http",
    "storage": "storage",
}


def section_keys(section_cls: type[Any]) -> list[tuple[str, dataclasses.Field[Any]]]:
    """The TOML key names of a section class, with their dataclass fields."""
    return [(f.name.replace("_", "-"), f) for f in dataclasses.fields(section_cls)]


def _check_type(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: must not be negative, got {value}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{where}: expected a table of strings, got {value!r}")
        return dict(value)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such keys yet
        raise ConfigError(f"{where}: unsupported type")
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _fill(section_cls: type[Any], table: Any, name: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}]: expected a table")
    hints = get_type_hints(section_cls)
    known = dict(section_keys(section_cls))
    values: dict[str, Any] = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"[{name}] {key}: unknown key")
        values[f.name] = _check_type(f"[{name}] {key}", value, hints[f.name])
    return section_cls(**values)


def load_config(path: str | Path | None) -> Config:
    """Read and check a TOML configuration; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = parse_config(data)
    config.source = source.resolve()
    return config


def parse_config(data: dict[str, Any]) -> Config:
    """Check a parsed TOML document and build the :class:`Config`."""
    config = Config()
    for top, value in data.items():
        if top == "push":
            if not isinstance(value, dict):
                raise ConfigError("[push]: expected a table")
            plain = {k: v for k, v in value.items() if not isinstance(v, dict)}
            for sub, subvalue in value.items():
                if isinstance(subvalue, dict):
                    attr = SECTIONS.get(f"push.{sub}")
                    if attr is None:
                        raise ConfigError(f"[push.{sub}]: unknown section")
                    setattr(
                        config, attr, _fill(type(getattr(config, attr)), subvalue, f"push.{sub}")
                    )
            config.push = _fill(PushSection, plain, "push")
        elif top == "apps":
            if not isinstance(value, dict):
                raise ConfigError("[apps]: expected a table of apps")
            for app_id, table in value.items():
                app = _fill(AppSection, table, f'apps."{app_id}"')
                config.apps[app_id] = app
        elif top in SECTIONS:
            attr = SECTIONS[top]
            setattr(config, attr, _fill(type(getattr(config, attr)), value, top))
        else:
            raise ConfigError(f"[{top}]: unknown section")
    _validate(config)
    return config


def _validate(config: Config) -> None:
    """Cross-key checks: refuse what cannot be honoured, naming the key."""
    if config.server.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"[server] log-level: expected debug, info, warning or error, "
            f"got {config.server.log_level!r}"
        )
    for alg in config.auth.algorithms:
        if alg not in ("SHA-256", "MD5"):
            raise ConfigError(f"[auth] algorithms: expected SHA-256 or MD5, got {alg!r}")
    if not config.auth.algorithms:
        raise ConfigError("[auth] algorithms: at least one of SHA-256, MD5")
    reg = config.registrar
    if reg.min_expires > reg.max_expires:
        raise ConfigError("[registrar] min-expires: larger than max-expires")
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        raise ConfigError("[registrar] default-expires: outside min-expires..max-expires")
    if config.external.method not in ("GET", "POST"):
        raise ConfigError(
            f"[push.external] method: expected GET or POST, got {config.external.method!r}"
        )
    if config.external.protocol not in ("http2", "http"):
        raise ConfigError(
            f"[push.external] protocol: expected http2 or http, got {config.external.protocol!r}"
        )
    if config.sip.t1 == 0 or config.sip.t2 < config.sip.t1:
        raise ConfigError("[sip] t2: must be at least t1, and t1 above 0")
    if config.sip.max_message_size < 1024:
        raise ConfigError("[sip] max-message-size: must be at least 1024")
    _validate_advertise(config.sip)
    if config.sip.max_connections_per_ip < 1:
        raise ConfigError("[sip] max-connections-per-ip: must be at least 1")
    if not 0 <= config.push.register_wakeup_threshold <= 100:
        raise ConfigError("[push] register-wakeup-threshold: expected a percentage 0..100")
    for app_id, app in config.apps.items():
        if app.provider not in ("apns", "apns.dev", "fcm", "webpush"):
            raise ConfigError(
                f'[apps."{app_id}"] provider: expected apns, apns.dev, fcm or webpush, '
                f"got {app.provider!r}"
            )
    if config.http.max_body_size < 1024:
        raise ConfigError("[http] max-body-size: must be at least 1024 bytes")
    hook = config.http.rejected_token_webhook
    if hook and not hook.startswith(("http://", "https://")):
        raise ConfigError(
            f"[http] rejected-token-webhook: expected an http(s):// URL, got {hook!r}"
        )


_SIP_TRANSPORTS = ("UDP", "TCP", "TLS", "WS", "WSS")
_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - recognised, never bound here


def parse_advertise(value: str) -> tuple[str | None, str, int | None]:
    """One ``[sip] advertise`` entry: (transport or None for all, host, port or None).

    An IPv6 host is written in brackets (``[2001:db8::1]:5060``) and returned without.
    """
    where = "[sip] advertise"
    transport: str | None = None
    rest = value.strip()
    scheme, sep, after = rest.partition("://")
    if sep:
        transport = scheme.upper()
        if transport not in _SIP_TRANSPORTS:
            raise ConfigError(
                f"{where}: expected udp://, tcp://, tls://, ws:// or wss://, got {value!r}"
            )
        rest = after
    port_text = ""
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ConfigError(f"{where}: malformed IPv6 host in {value!r}")
        port_text = tail[1:]
    elif rest.count(":") > 1:
        raise ConfigError(f"{where}: write an IPv6 host in brackets, got {value!r}")
    else:
        host, _, port_text = rest.partition(":")
    if not host or any(c in host for c in ' /;?@<>"\t'):
        raise ConfigError(f"{where}: expected host[:port], got {value!r}")
    if host in _WILDCARDS:
        raise ConfigError(f"{where}: {host} is not an address others can reach")
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"{where}: invalid port in {value!r}")
        port = int(port_text)
    return transport, host, port


def advertised_address(sip: SipSection, transport: str) -> tuple[str, int | None] | None:
    """What ``[sip] advertise`` says to show for ``transport``: (host, port or None)."""
    fallback: tuple[str, int | None] | None = None
    for value in sip.advertise:
        name, host, port = parse_advertise(value)
        if name == transport.upper():
            return host, port
        if name is None and fallback is None:
            fallback = host, port
    return fallback


def _validate_advertise(sip: SipSection) -> None:
    """Refuse a wildcard bind nobody could reach us back at (its Via would say 0.0.0.0)."""
    for value in sip.advertise:
        parse_advertise(value)
    for point in sip.listen:
        scheme, sep, rest = point.partition("://")
        if not sep:
            continue  # the listener itself reports a malformed listening point
        host, colon, _ = rest.rpartition(":")
        if not colon:
            continue
        host = host.strip("[]")
        if host in _WILDCARDS and advertised_address(sip, scheme) is None:
            raise ConfigError(
                f"[sip] advertise: listening point {point} binds every interface; set "
                f'[sip] advertise (e.g. advertise = ["sip.example.org"]) to the address '
                "phones and other servers reach it at"
            )
