"""``sipwake push``: the command-line pusher (Flexisip's ``flexisip_pusher``)."""

from __future__ import annotations

import argparse

APPLE_PUSH_TYPES = ("RemoteBasic", "RemoteWithMutableContent", "PushKit", "Background")


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    """The pusher's flags, as DESIGN.md fixes them.

    ``--pn-prid`` takes many tokens after one flag (``nargs``) and may also repeat:
    argparse is quadratic in repeated options, so tens of thousands of tokens must be
    given after one flag to parse in milliseconds.
    """
    p.add_argument("--pn-provider", required=True, choices=["apns", "apns.dev", "fcm", "webpush"])
    p.add_argument(
        "--pn-param",
        default="",
        metavar="P",
        help="RFC 8599 pn-param (e.g. TEAMID.org.example.app.voip)",
    )
    p.add_argument(
        "--pn-prid",
        action="extend",
        nargs="+",
        required=True,
        metavar="T",
        help="one or more device tokens",
    )
    p.add_argument("--apple-push-type", choices=APPLE_PUSH_TYPES, default="PushKit")
    p.add_argument("--call-id", default="")
    p.add_argument("--from-uri", default="")
    p.add_argument("--display-name", default="")
    p.add_argument("--text", default="")
    p.add_argument("--custom-payload", default=None, metavar="JSON")
    p.add_argument("--apns-key-file", metavar="FILE")
    p.add_argument("--apns-key-id")
    p.add_argument("--apns-team-id")
    p.add_argument("--apns-cert-dir", metavar="DIR")
    p.add_argument("--apns-cert-file", metavar="FILE")
    p.add_argument("--fcm-service-account", "--key", dest="fcm_service_account", metavar="FILE")
    p.add_argument("--fcm-api-key", help="deprecated legacy FCM server key")
    p.add_argument("--apns-url", metavar="URL", help="APNs base URL (e.g. the simulator)")
    p.add_argument("--fcm-url", metavar="URL", help="FCM base URL (e.g. the simulator)")
    p.add_argument("--ca-file", metavar="FILE", help="trust these CAs for provider TLS")
    p.add_argument("--vapid-key", metavar="FILE", help="Web Push VAPID P-256 private key (PEM)")
    p.add_argument("--vapid-subject", metavar="URL", help="Web Push VAPID subject (mailto:/https:)")
    p.add_argument(
        "--webpush-p256dh",
        metavar="KEY",
        help="subscription's p256dh key (base64url): encrypt the payload for it",
    )
    p.add_argument(
        "--webpush-auth", metavar="SECRET", help="subscription's auth secret (base64url)"
    )
    p.add_argument("--ttl", type=int, default=None, help="time to live in seconds")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--debug", action="store_true")


def run_push(args: argparse.Namespace) -> int:
    from sipwake.push.pusher import run

    result: int = run(args)
    return result
