"""Apps: AppIds (and RFC 8599 destinations) mapped to providers holding an app's credentials.

An app is a provider (``apns``, ``apns.dev``, ``fcm``, ``webpush``), the AppIds its devices
report (an iOS 13 app has two: an AppId ending in ``.voip`` names its PushKit token, the
other its remote-notification token) and its credentials. Apps come from the configuration
(``[apps."<id>"]``) and from the store (the ``/v1/apps`` API); the registry holds them in
memory so that looking up the provider of a push costs a dictionary access, and builds one
provider instance per credential, cached until that credential or its app changes.

Stored secrets are handed to providers that want a file path (APNs keys and certificates)
through an anonymous in-memory file (``memfd``), so a clear secret never touches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sipwake.config import AppSection, Config, ConfigError
from sipwake.push.providers.base import PushProvider
from sipwake.push.request import Destination, Provider, PushError, Service
from sipwake.store.base import Store
from sipwake.store.model import App, Credential

log = logging.getLogger(__name__)

# Same rules as RFC 8599 pn-prid parsing (push/params.py): tokens go into URL paths.
_APNS_TOKEN_RE = re.compile(r"[0-9A-Fa-f]{1,200}")
_FCM_TOKEN_RE = re.compile(r"[A-Za-z0-9_.:-]{1,4096}")

VOIP_SUFFIX = ".voip"
#: Credential types that can serve an app of each provider.
CREDENTIAL_TYPES_FOR: dict[Provider, tuple[str, ...]] = {
    Provider.APNS: ("ios", "ios-token"),
    Provider.APNS_DEV: ("ios", "ios-token"),
    Provider.FCM: ("android",),
    Provider.WEBPUSH: ("webpush",),
}


class CredentialError(ValueError):
    """An uploaded credential that cannot work; the message names the field and the fault."""


class AppError(ValueError):
    """A destination that cannot be built for an app (bad token, wrong AppId for the push)."""


# --- secrets as files -----------------------------------------------------------------------


class SecretFile:
    """A secret reachable by path for APIs that only read files (``ssl``, key loaders).

    On Linux it lives in an anonymous memory file (``memfd_create``) and its path is
    ``/proc/self/fd/N``; elsewhere a 0600 temporary file, removed by :meth:`close`.
    """

    def __init__(self, data: bytes) -> None:
        self._tmp: str | None = None
        memfd = getattr(os, "memfd_create", None)
        fd: int | None = None
        if memfd is not None:
            with contextlib.suppress(OSError):
                fd = memfd("sipwake-secret", getattr(os, "MFD_CLOEXEC", 0))
        if fd is None:  # pragma: no cover - non-Linux
            fd, self._tmp = tempfile.mkstemp(prefix="sipwake-secret-")
        self._fd = fd
        os.write(fd, data)
        self.path = self._tmp or f"/proc/self/fd/{fd}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:  # pragma: no cover - non-Linux
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)


# --- credential validation ------------------------------------------------------------------


def _str_field(data: dict[str, Any], name: str, required: bool = True) -> str:
    value = data.get(name, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise CredentialError(f"{name}: expected a string")
    if required and not value.strip():
        raise CredentialError(f"{name}: missing")
    return value.strip() if name not in ("certificate", "private_key") else value


def _private_key(pem: str, name: str) -> Any:
    try:
        return serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        detail = "encrypted keys are not supported" if "password" in str(exc).lower() else ""
        raise CredentialError(
            f"{name}: not an unencrypted PEM private key{': ' + detail if detail else ''}"
        ) from None


def _apns_uid(cert: x509.Certificate) -> str:
    """The bundle id Apple writes in a push certificate's UID attribute."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else ""


def validate_credential(data: dict[str, Any]) -> Credential:
    """Check an uploaded credential (the JSON of ``POST /v1/push-credentials``).

    Returns a :class:`Credential` with its public fields filled in and its ``secret`` set;
    raises :class:`CredentialError` saying what is wrong (never echoing the secret).
    """
    ctype = data.get("type")
    if not isinstance(ctype, str) or ctype not in ("ios", "ios-token", "android", "webpush"):
        raise CredentialError("type: expected one of ios, ios-token, android, webpush")
    alias = _str_field(data, "alias", required=False)
    bundle_id = _str_field(data, "bundle_id", required=False)
    cred = Credential(alias=alias, type=ctype, bundle_id=bundle_id)
    if ctype == "ios":
        cert_pem = _str_field(data, "certificate")
        key_pem = _str_field(data, "private_key")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError:
            raise CredentialError("certificate: not a PEM X.509 certificate") from None
        key = _private_key(key_pem, "private_key")
        pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        cert_pub = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if pub != cert_pub:
            raise CredentialError("private_key: does not match the certificate")
        cred.cert_subject = cert.subject.rfc4514_string()
        cred.cert_expires_at = cert.not_valid_after_utc.timestamp()
        uid = _apns_uid(cert)
        if uid and not cred.bundle_id:
            cred.bundle_id = uid.removesuffix(VOIP_SUFFIX)
        cred.secret = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    elif ctype == "ios-token":
        key_pem = _str_field(data, "private_key")
        cred.key_id = _str_field(data, "key_id")
        cred.team_id = _str_field(data, "team_id")
        key = _private_key(key_pem, "private_key")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise CredentialError("private_key: not an EC P-256 key (APNs .p8 keys are ES256)")
        cred.secret = key_pem.encode()
    elif ctype == "android":
        from sipwake.push.providers.fcm_auth import ServiceAccount

        raw = data.get("project_account_json_file")
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise CredentialError(f"project_account_json_file: not JSON: {exc}") from None
        if raw is None:
            raise CredentialError("project_account_json_file: missing (the service-account JSON)")
        try:
            account = ServiceAccount.from_json(raw, "project_account_json_file")
        except PushError as exc:
            raise CredentialError(str(exc)) from None
        cred.project_id = account.project_id
        cred.secret = json.dumps(raw).encode()
    else:  # webpush
        from sipwake.push.providers.webpush import VapidKey

        key_pem = _str_field(data, "private_key")
        subject = _str_field(data, "subject")
        key = _private_key(key_pem, "private_key")
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialError("private_key: a VAPID key must be an EC P-256 key")
        try:
            VapidKey(key, subject)
        except PushError as exc:
            raise CredentialError(str(exc)) from None
        cred.secret = json.dumps({"private_key": key_pem, "subject": subject}).encode()
    return cred


# --- apps -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppInfo:
    """An app as the HTTP API sees it: enough to turn an AppId and a token into a push."""

    key: str  # "config:<AppId>" or the store's app id
    name: str
    provider: Provider
    target: str  # APNs bundle id, Firebase project, or "" for Web Push
    app_ids: tuple[str, ...] = ()

    def is_voip_id(self, app_id: str) -> bool:
        """Whether ``app_id`` names the PushKit token of an iOS app."""
        return self.provider in (Provider.APNS, Provider.APNS_DEV) and app_id.endswith(VOIP_SUFFIX)

    def destination(self, app_id: str, token: str) -> Destination:
        """The destination of ``token`` reported under ``app_id``.

        The token is checked as ``pn-prid`` is (it ends up in a URL path or a URI), without
        the cost of parsing a whole parameter set: this runs once per HTTP push.
        """
        if self.provider in (Provider.APNS, Provider.APNS_DEV):
            if not _APNS_TOKEN_RE.fullmatch(token):
                raise AppError("DeviceToken: invalid APNs token (expected hexadecimal digits)")
            service = Service.VOIP if app_id.endswith(VOIP_SUFFIX) else Service.REMOTE
            return Destination(self.provider, self.target, token, service)
        if self.provider is Provider.FCM:
            if not _FCM_TOKEN_RE.fullmatch(token):
                raise AppError("DeviceToken: invalid FCM registration token")
            return Destination(self.provider, self.target, token)
        url = urllib.parse.urlsplit(token)
        if url.scheme.lower() != "https" or not url.hostname:
            raise AppError("DeviceToken: a Web Push subscription must be an https:// URI")
        # Web Push destinations carry no app id; the AppId selects the VAPID key.
        return Destination(self.provider, app_id, token)


def _route_key(provider: Provider, target: str) -> tuple[str, str]:
    family = "apple" if provider in (Provider.APNS, Provider.APNS_DEV) else provider.value
    return family, target


def _keys_of(info: AppInfo) -> list[tuple[str, str]]:
    """Routing keys of an app: its bundle or project; each AppId for Web Push."""
    if info.provider is Provider.WEBPUSH:
        return [_route_key(info.provider, ident) for ident in info.app_ids]
    return [_route_key(info.provider, info.target)]


def _dest_route_key(dest: Destination) -> tuple[str, str]:
    return _route_key(dest.provider, dest.app_id)


def apns_target(app_ids: Iterable[str], credential_bundle: str = "") -> str:
    """The bundle id of an iOS app: the credential's, or the AppIds without ``.voip``."""
    if credential_bundle:
        return credential_bundle
    ids = list(app_ids)
    plain = [a for a in ids if not a.endswith(VOIP_SUFFIX)]
    return (plain or [a.removesuffix(VOIP_SUFFIX) for a in ids] or [""])[0]


@dataclass
class _Built:
    provider: PushProvider
    files: list[SecretFile] = field(default_factory=list)

    async def aclose(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            for f in self.files:
                f.close()


class ProviderFactory:
    """Builds provider instances with the server-wide endpoints and trust store."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def _ssl_context(self) -> ssl.SSLContext | None:
        ca = self.config.push.ca_file
        if not ca:
            return None
        return ssl.create_default_context(cafile=str(self.config.resolve_path(ca)))

    def apns(self, **settings: Any) -> PushProvider:
        from sipwake.push.providers.apns import ApnsProvider, ApnsSettings

        cfg = self.config
        ca = str(cfg.resolve_path(cfg.push.ca_file)) if cfg.push.ca_file else ""
        return ApnsProvider(
            ApnsSettings(
                server=cfg.apple.server, dev_server=cfg.apple.dev_server, ca_file=ca, **settings
            )
        )

    def fcm(self, accounts: dict[str, Any]) -> PushProvider:
        from sipwake.push.providers.fcm import FcmV1Provider
        from sipwake.push.providers.transport import make_transport

        # One context each: the HTTP/2 client sets ALPN to h2 only on the context it gets,
        # which would make the HTTP/1.1 token endpoint negotiate a protocol it cannot speak.
        return FcmV1Provider(
            accounts,
            server=self.config.firebase.server,
            transport=make_transport("http2", ssl_context=self._ssl_context()),
            token_transport=make_transport("http", ssl_context=self._ssl_context()),
            anticipation=float(self.config.firebase.token_expiration_anticipation_time),
            refresh_interval=float(self.config.firebase.default_refresh_interval),
        )

    def webpush(self, key: Any, subject: str) -> PushProvider:
        from sipwake.push.providers.transport import make_transport
        from sipwake.push.providers.webpush import VapidKey, WebPushProvider

        return WebPushProvider(
            VapidKey(key, subject),
            transport=make_transport("http", ssl_context=self._ssl_context()),
        )

    def from_credential(self, cred: Credential, secret: bytes) -> _Built:
        """A provider for one stored credential (its secret in clear, kept in memory)."""
        if cred.type == "ios":
            f = SecretFile(secret)
            try:
                return _Built(self.apns(cert_file=f.path), [f])
            except BaseException:
                f.close()
                raise
        if cred.type == "ios-token":
            f = SecretFile(secret)
            try:
                return _Built(
                    self.apns(key_file=f.path, key_id=cred.key_id, team_id=cred.team_id), [f]
                )
            except BaseException:
                f.close()
                raise
        if cred.type == "android":
            from sipwake.push.providers.fcm_auth import ServiceAccount

            account = ServiceAccount.from_json(json.loads(secret), f"credential {cred.id}")
            return _Built(self.fcm({cred.project_id or account.project_id: account}))
        data = json.loads(secret)
        key = serialization.load_pem_private_key(data["private_key"].encode(), None)
        return _Built(self.webpush(key, data["subject"]))

    def from_section(self, app_id: str, app: AppSection) -> tuple[AppInfo, _Built]:
        """The app and provider of ``[apps."<app_id>"]``; errors name the key."""
        where = f'[apps."{app_id}"]'
        provider = Provider(app.provider)
        ids = tuple(dict.fromkeys([app_id, *app.app_ids]))
        try:
            if provider in (Provider.APNS, Provider.APNS_DEV):
                target = app.bundle_id or apns_target(ids)
                settings: dict[str, Any] = {}
                if app.key_file:
                    settings.update(
                        key_file=str(self.config.resolve_path(app.key_file)),
                        key_id=app.key_id,
                        team_id=app.team_id,
                    )
                if app.certificate_file:
                    settings["cert_file"] = str(self.config.resolve_path(app.certificate_file))
                if not settings:
                    raise ConfigError(f"{where} key-file: give key-file or certificate-file")
                built = _Built(self.apns(**settings))
            elif provider is Provider.FCM:
                from sipwake.push.providers.fcm_auth import ServiceAccount

                if not app.service_account:
                    raise ConfigError(f"{where} service-account: missing")
                account = ServiceAccount.load(self.config.resolve_path(app.service_account))
                target = app.project or account.project_id
                built = _Built(self.fcm({target: account}))
            else:
                from sipwake.push.providers.webpush import VapidKey

                if not app.vapid_private_key or not app.vapid_subject:
                    raise ConfigError(
                        f"{where} vapid-private-key: webpush apps need vapid-private-key "
                        "and vapid-subject"
                    )
                vapid = VapidKey.load(
                    self.config.resolve_path(app.vapid_private_key), app.vapid_subject
                )
                target = ""
                built = _Built(self.webpush(vapid.private_key, vapid.subject))
        except PushError as exc:
            field_name = getattr(exc, "field", "")
            key = f" {field_name.replace('_', '-')}" if field_name else ""
            raise ConfigError(f"{where}{key}: {exc}") from None
        return AppInfo(f"config:{app_id}", app_id, provider, target, ids), built


def default_providers(config: Config) -> list[PushProvider]:
    """Server-wide providers from ``[push.apple]``, ``[push.firebase]``, ``[push.webpush]``,
    or only the external pusher of ``[push.external]`` when its ``uri`` is set.

    They serve destinations that no app claims (RFC 8599 parameters of any bundle the
    server-wide key may sign for). Raises :class:`ConfigError` naming the key at fault.
    """
    if config.external.uri:
        # As in Flexisip, the external pusher takes every push (the registrar accepts
        # every pn-provider for it): the native providers are not built.
        from sipwake.push.providers.external import build_external_provider

        try:
            external = build_external_provider(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        assert external is not None
        return [external]
    factory = ProviderFactory(config)
    providers: list[PushProvider] = []
    apple = config.apple
    if apple.enabled and (apple.key_file or apple.certificate_dir):
        from sipwake.push.providers.apns import ApnsConfigError, ApnsProvider, ApnsSettings

        try:
            providers.append(ApnsProvider(ApnsSettings.from_config(config)))
        except ApnsConfigError as exc:
            raise ConfigError(f"[push.apple] {exc.field.replace('_', '-')}: {exc}") from None
    fb = config.firebase
    if fb.enabled and fb.service_accounts:
        from sipwake.push.providers.fcm_auth import ServiceAccount

        try:
            accounts = {
                project: ServiceAccount.load(config.resolve_path(path))
                for project, path in fb.service_accounts.items()
            }
        except PushError as exc:
            raise ConfigError(f"[push.firebase] service-accounts: {exc}") from None
        providers.append(factory.fcm(accounts))
    wp = config.webpush
    if wp.vapid_private_key:
        from sipwake.push.providers.webpush import VapidKey

        try:
            vapid = VapidKey.load(config.resolve_path(wp.vapid_private_key), wp.vapid_subject)
        except PushError as exc:
            raise ConfigError(f"[push.webpush] vapid-private-key: {exc}") from None
        providers.append(factory.webpush(vapid.private_key, vapid.subject))
    return providers


class AppRegistry:
    """AppIds → apps, and destinations → the provider holding their app's credentials.

    :meth:`provider_for` is the push service's lookup hook: a destination whose bundle,
    Firebase project or Web Push AppId belongs to an app is sent with that app's
    credentials; other destinations fall through to the server-wide providers.
    """

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store = store
        self.factory = ProviderFactory(config)
        self._apps: dict[str, AppInfo] = {}  # AppId -> app
        self._routes: dict[tuple[str, str], PushProvider] = {}
        self._config_built: list[_Built] = []
        self._config_apps: dict[str, AppInfo] = {}
        self._config_routes: dict[tuple[str, str], PushProvider] = {}
        self._cache: dict[tuple[str, float], _Built] = {}  # (credential id, updated) -> built
        self._reloading = asyncio.Lock()  # one reload at a time: no provider built twice

    async def load(self) -> None:
        """Build the configured apps, then the stored ones."""
        for app_id, section in self.config.apps.items():
            info, built = self.factory.from_section(app_id, section)
            self._config_built.append(built)
            for ident in info.app_ids:
                self._config_apps[ident] = info
            for key in _keys_of(info):
                self._config_routes[key] = built.provider
        await self.reload()

    async def reload(self) -> None:
        """Re-read the stored apps: call after any app or credential changes.

        Providers whose credential did not change are kept (with their connections);
        the others are built anew and the unused ones closed. Configured apps win over
        stored apps that claim the same AppId.
        """
        async with self._reloading:
            await self._reload()

    async def _reload(self) -> None:
        apps: dict[str, AppInfo] = dict(self._config_apps)
        routes: dict[tuple[str, str], PushProvider] = dict(self._config_routes)
        cache: dict[tuple[str, float], _Built] = {}
        if self.store is not None:
            for app in await self._all_apps():
                try:
                    info, built = await self._build_stored(app, cache)
                except Exception as exc:  # one bad record must not hide the others
                    log.warning("app %s (%s) unusable: %s", app.name, app.id, exc)
                    continue
                for ident in info.app_ids:
                    apps.setdefault(ident, info)
                if built is not None:
                    for key in _keys_of(info):
                        routes.setdefault(key, built.provider)
        stale = [b for k, b in self._cache.items() if k not in cache]
        self._apps, self._routes, self._cache = apps, routes, cache
        for built in stale:
            await built.aclose()

    async def _all_apps(self) -> list[App]:
        assert self.store is not None
        out: list[App] = []
        offset = 0
        while True:
            page = await self.store.apps.list(offset=offset, limit=200)
            out.extend(page.items)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return out

    async def _build_stored(
        self, app: App, cache: dict[tuple[str, float], _Built]
    ) -> tuple[AppInfo, _Built | None]:
        assert self.store is not None
        provider = Provider(app.provider)
        allowed = CREDENTIAL_TYPES_FOR[provider]
        cred: Credential | None = None
        for cid in app.credential_ids:
            c = await self.store.credentials.get(cid)
            if c is not None and c.type in allowed:
                cred = c
                break
        if provider in (Provider.APNS, Provider.APNS_DEV):
            target = apns_target(app.app_ids, cred.bundle_id if cred else "")
        elif provider is Provider.FCM:
            target = cred.project_id if cred else ""
        else:
            target = ""
        info = AppInfo(app.id, app.name, provider, target, tuple(app.app_ids))
        if cred is None:
            return info, None
        key = (cred.id, cred.updated_at)
        built = cache.get(key) or self._cache.get(key)
        if built is None:
            secret = await self.store.credentials.get_secret(cred.id)
            built = self.factory.from_credential(cred, secret)
        cache[key] = built
        return info, built

    def find(self, app_id: str) -> AppInfo | None:
        """The app that owns ``app_id``, or None."""
        return self._apps.get(app_id)

    def provider_for(self, destination: Destination) -> PushProvider | None:
        """The provider holding the credentials of ``destination``'s app, if any app has it."""
        return self._routes.get(_dest_route_key(destination))

    def providers(self) -> Sequence[PushProvider]:
        return list({id(p): p for p in self._routes.values()}.values())

    async def aclose(self) -> None:
        cached, self._cache = list(self._cache.values()), {}
        for built in [*cached, *self._config_built]:
            with contextlib.suppress(Exception):
                await built.aclose()
        self._config_built = []
        self._routes = {}
