"""``sipwake push`` builders for FCM, Web Push and the external pusher.

Each takes the parsed flags and the configuration and returns a provider, or None when the
flags are for another provider; a flag or file that cannot be used ends in a
:class:`UsageError` naming the flag.
"""

from __future__ import annotations

import argparse

from sipwake.config import Config
from sipwake.errors import UsageError
from sipwake.push.providers.base import PushProvider
from sipwake.push.providers.external import build_external_provider
from sipwake.push.providers.fcm import build_fcm_provider
from sipwake.push.providers.webpush import build_webpush_provider, keys_from_b64
from sipwake.push.request import PushError


def build_external(args: argparse.Namespace, config: Config) -> PushProvider | None:
    """The external pusher takes every push when ``[push.external] uri`` is set."""
    try:
        return build_external_provider(config, ca_file=args.ca_file)
    except ValueError as exc:
        raise UsageError(f"--config: {exc}") from None


def build_fcm(args: argparse.Namespace, config: Config) -> PushProvider | None:
    """FCM from ``--fcm-service-account``/``--key``, ``--fcm-api-key``, ``--fcm-url``.

    The service account or key serves the project named by ``--pn-param``, on top of the
    projects of ``[push.firebase]``.
    """
    if args.pn_provider != "fcm":
        return None
    project = args.pn_param
    if (args.fcm_service_account or args.fcm_api_key) and not project:
        flag = "--fcm-service-account" if args.fcm_service_account else "--fcm-api-key"
        raise UsageError(f"--pn-param: the Firebase project of {flag} is required")
    accounts = {project: args.fcm_service_account} if args.fcm_service_account else {}
    keys = {project: args.fcm_api_key} if args.fcm_api_key else {}
    try:
        provider = build_fcm_provider(
            config,
            service_accounts=accounts,
            api_keys=keys,
            server=args.fcm_url,
            ca_file=args.ca_file,
        )
    except PushError as exc:
        flag = "--fcm-service-account" if args.fcm_service_account else "--config"
        raise UsageError(f"{flag}: {exc}") from None
    if provider is None:
        raise UsageError(
            "--fcm-service-account: no FCM credentials: give --fcm-service-account (--key) "
            "or --fcm-api-key, or [push.firebase] in --config"
        )
    return provider


def build_webpush(args: argparse.Namespace, config: Config) -> PushProvider | None:
    """Web Push from ``--vapid-key``/``--vapid-subject`` (or ``[push.webpush]``).

    With ``--webpush-p256dh`` and ``--webpush-auth`` every ``--pn-prid`` subscription gets
    an encrypted payload.
    """
    if args.pn_provider != "webpush":
        return None
    keys = None
    if bool(args.webpush_p256dh) != bool(args.webpush_auth):
        missing = "--webpush-auth" if args.webpush_p256dh else "--webpush-p256dh"
        raise UsageError(f"{missing}: required with the other subscription key")
    if args.webpush_p256dh:
        try:
            sub_keys = keys_from_b64(args.webpush_p256dh, args.webpush_auth)
        except PushError as exc:
            raise UsageError(f"--webpush-p256dh: {exc}") from None
        keys = dict.fromkeys(args.pn_prid, sub_keys)
    try:
        provider = build_webpush_provider(
            config,
            key_file=args.vapid_key,
            subject=args.vapid_subject,
            ca_file=args.ca_file,
            subscription_keys=keys,
        )
    except PushError as exc:
        flag = "--vapid-subject" if "subject" in str(exc) else "--vapid-key"
        raise UsageError(f"{flag}: {exc}") from None
    if provider is None:
        raise UsageError("--vapid-key: Web Push needs a VAPID key (or [push.webpush] in --config)")
    return provider
