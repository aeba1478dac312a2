"""``sipwake push``: the command-line pusher (Flexisip's ``flexisip_pusher``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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


def dash_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with option values that begin with "-" attached to their flag.

    argparse takes ``--pn-prid -Abc:APA91b...`` for two flags and refuses it ("expected at
    least one argument"), but FCM tokens begin with "-" now and then (base64url), and so
    may a display name or a text. A word that starts with "-" and is not one of the
    parser's own flags is a value here: it is written ``--flag=value``, which argparse
    reads as one (after a many-valued flag, the flag is repeated: it extends).
    """
    takes: dict[str, int | str | None] = {}  # flag -> nargs, for flags taking values
    for action in parser._actions:
        if action.nargs != 0:
            for flag in action.option_strings:
                takes[flag] = action.nargs
    out: list[str] = []
    flag = ""  # the flag whose values may follow ("": none)
    pending = ""  # that flag, read but not written yet (its next word decides how)
    many = reopen = False
    for word in argv:
        dash_value = word.startswith("-") and word != "--" and not _is_flag(word, parser)
        if flag and dash_value:
            out.append(f"{flag}={word}")
            pending = ""
            reopen, flag = (True, flag) if many else (False, "")
            continue
        if pending:
            out.append(pending)
        elif reopen and not word.startswith("-"):
            out.append(flag)  # ``--flag=value`` took one value: open the flag again
        pending, reopen = "", False
        if word in takes:
            pending = flag = word
            many = takes[word] in ("+", "*")
            continue
        out.append(word)
        if word.startswith("-") or not many:
            flag = ""
    if pending:
        out.append(pending)
    return out


def _is_flag(word: str, parser: argparse.ArgumentParser) -> bool:
    """Whether argparse reads ``word`` as one of its flags (``--flag=value``, a flag
    without value, or an abbreviation)."""
    name = word.split("=", 1)[0]
    return any(
        flag == name or (name.startswith("--") and len(name) > 2 and flag.startswith(name))
        for action in parser._actions
        for flag in action.option_strings
    )
