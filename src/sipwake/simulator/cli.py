"""``sipwake simulate``: local look-alikes of APNs (and later FCM and Web Push)."""

from __future__ import annotations

import argparse

EPILOG = """\
state.json in the state directory lists the URLs, the CA file, the APNs .p8 key, its key id
and team id, the client-certificate directory and the admin URL. For example:
  sipwake push --pn-provider apns.dev --pn-param TEAMID.org.example.app --pn-prid TOKEN \\
    --apns-url SANDBOX_URL --ca-file STATE/ca.pem --apns-key-file KEY.p8 \\
    --apns-key-id KEYID --apns-team-id TEAMID
Admin endpoint: GET/DELETE /apns/pushes, GET/POST/DELETE /apns/tokens and /apns/faults.
"""


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument(
        "--state-dir",
        default="./sipwake-sim",
        metavar="DIR",
        help="where the CA, keys, certificates and state.json are written (reused)",
    )
    p.add_argument(
        "--apns-port", type=int, default=0, metavar="PORT", help="APNs production (0 = any)"
    )
    p.add_argument(
        "--apns-dev-port",
        type=int,
        default=0,
        metavar="PORT",
        help="APNs development/sandbox port (0 = any)",
    )
    p.add_argument(
        "--admin-port", type=int, default=0, metavar="PORT", help="admin HTTP port (0 = any)"
    )
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="BUNDLE",
        help="app bundle id the team may push to (repeatable; default org.example.app)",
    )
    p.add_argument("--team-id", metavar="ID", help="APNs team id (default: generated, reused)")
    p.add_argument("--key-id", metavar="ID", help="APNs key id (default: generated, reused)")
    p.add_argument(
        "--reject-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 410 Unregistered for this token (repeatable)",
    )
    p.add_argument(
        "--expired-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 410 ExpiredToken for this token (repeatable)",
    )
    p.add_argument(
        "--bad-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 400 BadDeviceToken for this token (repeatable)",
    )
    p.add_argument(
        "--dev-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="token of a development build: refused by production (repeatable)",
    )
    p.add_argument(
        "--prod-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="token of a production build: refused by development (repeatable)",
    )
    p.add_argument(
        "--fail-first",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N requests with --fail-status",
    )
    p.add_argument(
        "--fail-status",
        type=int,
        default=503,
        choices=(429, 503),
        help="status of --fail-first answers (503 ServiceUnavailable, 429 TooManyRequests)",
    )
    p.add_argument(
        "--retry-after", type=int, metavar="SECONDS", help="retry-after header on those answers"
    )
    p.add_argument(
        "--goaway-after",
        type=int,
        default=0,
        metavar="N",
        help="send GOAWAY after N streams on each connection",
    )
    p.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="delay every response"
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=1000,
        metavar="N",
        help="HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised (1000)",
    )
    p.add_argument(
        "--token-update-interval",
        type=float,
        metavar="SECONDS",
        help="answer 429 TooManyProviderTokenUpdates when a connection changes provider "
        "token sooner than this (APNs: 1200; default: no limit)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="GOAWAY (IdleTimeout) and close connections idle this long",
    )
    p.add_argument(
        "--token-limit",
        type=int,
        default=0,
        metavar="N",
        help="answer 429 TooManyRequests beyond N pushes to one token per --token-window",
    )
    p.add_argument(
        "--token-window",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="window of --token-limit (1)",
    )
    p.add_argument(
        "--require-push-type",
        action="store_true",
        help="answer 400 InvalidPushType when apns-push-type is missing (default: infer it)",
    )
    p.add_argument("--quiet", action="store_true", help="do not print a line per push")
    p.add_argument(
        "--fcm-port", type=int, default=0, metavar="PORT", help="FCM (HTTP/2, TLS) port (0 = any)"
    )
    p.add_argument(
        "--fcm-project",
        default="sipwake-sim",
        metavar="PROJECT",
        help="Firebase project of the generated service account (sipwake-sim)",
    )
    p.add_argument(
        "--webpush-port", type=int, default=0, metavar="PORT", help="Web Push (TLS) port (0 = any)"
    )
    p.add_argument(
        "--external-port",
        type=int,
        default=0,
        metavar="PORT",
        help="external-pusher receiver (HTTP/1.1) port (0 = any)",
    )


def run_simulate(args: argparse.Namespace) -> int:
    from sipwake.simulator.main import run

    return run(args)
