"""The pusher behind ``sipwake push``: flags in, pushes out, one summary line.

It is Flexisip's ``flexisip_pusher`` for sipwake: the same flags, the same closing line
(``N push notification(s) sent, S successfully and F failed.``), exit status 0 only when
nothing failed. Mistakes in flags or files end in one line naming the flag, status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from sipwake.config import Config, ConfigError, load_config
from sipwake.errors import UsageError
from sipwake.push.params import PushParamsError, parse_push_params
from sipwake.push.providers.base import PushProvider
from sipwake.push.request import (
    Destination,
    Outcome,
    PushError,
    PushKind,
    PushRequest,
    PushResult,
    Service,
)
from sipwake.push.service import PushService

# --apple-push-type → (kind, mutable-content, token service on iOS)
APPLE_PUSH_TYPES: dict[str, tuple[PushKind, bool, Service]] = {
    "PushKit": (PushKind.CALL, False, Service.VOIP),
    "RemoteBasic": (PushKind.MESSAGE, False, Service.REMOTE),
    "RemoteWithMutableContent": (PushKind.MESSAGE, True, Service.REMOTE),
    "Background": (PushKind.BACKGROUND, False, Service.REMOTE),
}

# Names of provider settings fields → the flag that sets them, for error messages.
APNS_FLAGS = {
    "key_file": "--apns-key-file",
    "key_id": "--apns-key-id",
    "team_id": "--apns-team-id",
    "certificate_dir": "--apns-cert-dir",
    "cert_file": "--apns-cert-file",
    "ca_file": "--ca-file",
    "server": "--apns-url",
    "dev_server": "--apns-url",
}

ProviderBuilder = Callable[[argparse.Namespace, Config], PushProvider | None]


def _load_config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}") from None


def _custom_payload(args: argparse.Namespace) -> Mapping[str, Any] | None:
    if args.custom_payload is None:
        return None
    try:
        value = json.loads(args.custom_payload)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--custom-payload: not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise UsageError("--custom-payload: expected a JSON object")
    return value


def destination_for(provider: str, param: str, token: str, service: Service) -> Destination:
    """The destination of one ``--pn-prid`` token.

    A token in the iOS 13 form (``VOIP:voip&REMOTE:remote``) picks the one ``service``
    needs. For a single Apple token, the push type decides: PushKit goes to the bundle's
    ``.voip`` topic, other types to the bundle itself, whether or not ``--pn-param``
    ended in ``.voip``.
    """
    try:
        params = parse_push_params({"pn-provider": provider, "pn-param": param, "pn-prid": token})
    except PushParamsError as exc:
        name, sep, rest = str(exc).partition(": ")
        if sep and name.startswith("pn-"):
            raise UsageError(f"--{name}: {rest}") from None
        raise UsageError(str(exc)) from None
    if not params.destinations:
        raise UsageError(f"--pn-prid: no device token in {token!r}")
    chosen = params.for_service(service)
    if chosen is not None:
        return chosen
    if len(params.destinations) > 1:
        raise UsageError(f"--pn-prid: {token[:8]}… has no {service.value} token")
    dest = params.destinations[0]
    if dest.is_apple and dest.service is not service:
        return Destination(dest.provider, dest.app_id, dest.token, service, dest.team_id)
    return dest


def build_apns(args: argparse.Namespace, config: Config) -> PushProvider | None:
    """The APNs provider from ``[push.apple]`` and the ``--apns-*`` flags."""
    if args.pn_provider not in ("apns", "apns.dev"):
        return None
    from sipwake.push.providers.apns import ApnsConfigError, ApnsProvider, ApnsSettings

    overrides: dict[str, Any] = {}
    for field_name, attr in (
        ("key_file", "apns_key_file"),
        ("key_id", "apns_key_id"),
        ("team_id", "apns_team_id"),
        ("certificate_dir", "apns_cert_dir"),
        ("cert_file", "apns_cert_file"),
        ("ca_file", "ca_file"),
    ):
        value = getattr(args, attr)
        if value is not None:
            overrides[field_name] = value
    if args.apns_url:
        overrides["dev_server" if args.pn_provider == "apns.dev" else "server"] = args.apns_url
    try:
        return ApnsProvider(ApnsSettings.from_config(config, **overrides))
    except ApnsConfigError as exc:
        flag = APNS_FLAGS.get(exc.field, exc.field)
        raise UsageError(f"{flag}: {exc}") from None


def _builders() -> list[ProviderBuilder]:
    """Each provider module contributes a builder; the first that returns a provider is
    used. The external pusher comes first: when configured it takes every push."""
    from sipwake.push.providers.pusher_flags import build_external, build_fcm, build_webpush

    return [build_external, build_apns, build_fcm, build_webpush]


def build_requests(args: argparse.Namespace, config: Config) -> list[PushRequest]:
    """One request per ``--pn-prid`` token."""
    kind, mutable, service = APPLE_PUSH_TYPES[args.apple_push_type]
    if args.ttl is not None and args.ttl < 0:
        raise UsageError("--ttl: must not be negative")
    if args.ttl is not None:
        ttl = args.ttl
    elif kind is PushKind.CALL:
        ttl = config.router.call_fork_timeout
    else:
        ttl = config.push.message_time_to_live or config.router.message_delivery_timeout
    custom = _custom_payload(args)
    requests = []
    for token in args.pn_prid:
        dest = destination_for(args.pn_provider, args.pn_param, token, service)
        requests.append(
            PushRequest(
                destination=dest,
                kind=kind,
                call_id=args.call_id,
                from_uri=args.from_uri,
                display_name=args.display_name,
                text=args.text,
                ttl=ttl,
                custom_payload=custom,
                mutable_content=mutable,
                no_badge=config.push.no_badge,
                display_from_uri=bool(args.from_uri or args.display_name)
                or config.push.display_from_uri,
            )
        )
    return requests


def _describe(request: PushRequest, result: PushResult) -> str:
    dest = request.destination
    what = {
        Outcome.SENT: "sent",
        Outcome.FAILED: "failed",
        Outcome.TOKEN_REJECTED: "token rejected",
    }[result.outcome]
    line = f"{dest.provider.value} {dest.token_prefix()}: {what}"
    if result.reason:
        line += f": {result.reason}"
    if result.provider_id:
        line += f" (id {result.provider_id})"
    return line


async def push_all(
    requests: list[PushRequest], provider: PushProvider, out: TextIO, debug: bool
) -> tuple[int, int]:
    """Send every request; print failures (and successes with ``--debug``)."""
    # Every token given on the command line is sent: none waits beyond the service's
    # concurrency only to fail, however long the list (max-queue-size 0: no bound).
    service = PushService([provider], max_queue_size=0)
    try:
        results = await service.send_many(requests)
    finally:
        await service.aclose()
    ok = 0
    for request, result in zip(requests, results, strict=True):
        if result.ok:
            ok += 1
            if debug:
                out.write(_describe(request, result) + "\n")
        else:
            out.write(_describe(request, result) + "\n")
    return ok, len(results) - ok


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = _load_config(args)
    requests = build_requests(args, config)
    provider = None
    for builder in _builders():
        provider = builder(args, config)
        if provider is not None:
            break
    if provider is None:
        raise UsageError(f"--pn-provider: {args.pn_provider} is not supported by this pusher")
    refused = [r for r in requests if not provider.accepts(r.destination)]
    if refused:
        if args.pn_provider.startswith("apns"):
            raise UsageError(
                "--apns-key-file: no APNs credentials for this topic: give --apns-key-file "
                "with --apns-key-id and --apns-team-id, --apns-cert-dir or --apns-cert-file"
            )
        raise UsageError(f"--pn-provider: no credentials for {args.pn_provider}")
    try:
        ok, failed = asyncio.run(push_all(requests, provider, out, args.debug))
    except PushError as exc:
        raise UsageError(str(exc)) from None
    out.write(f"{ok + failed} push notification(s) sent, {ok} successfully and {failed} failed.\n")
    out.flush()
    return 0 if failed == 0 else 1
