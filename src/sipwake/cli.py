"""The ``sipwake`` command: ``serve``, ``push`` and ``simulate``.

Every bad flag or file ends in one line naming the flag and exit status 2, never a
traceback: operators paste these lines into tickets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from sipwake import __version__
from sipwake.errors import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class _Version(argparse.Action):
    """``--version``: the version and whether the hot path runs compiled (mypyc), which
    imports those modules, so only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> NoReturn:
        from sipwake.compiled import summary

        sys.stdout.write(f"sipwake {__version__} ({summary()})\n")
        raise SystemExit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sipwake", description=__doc__)
    parser.add_argument(
        "--version", action=_Version, help="show the version and what runs compiled"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the SIP registrar/proxy and the HTTP API")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")

    from sipwake.push.cli import add_push_arguments
    from sipwake.simulator.cli import add_simulate_arguments

    add_push_arguments(sub.add_parser("push", help="send push notifications"))
    add_simulate_arguments(
        sub.add_parser("simulate", help="run local APNs/FCM/Web Push look-alikes")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["push"]:  # device tokens may begin with "-"
        from sipwake.push.cli import add_push_arguments, dash_values

        push = argparse.ArgumentParser(add_help=False)
        add_push_arguments(push)
        words = ["push", *dash_values(words[1:], push)]
    args = parser.parse_args(words)
    try:
        if args.command == "serve":
            from sipwake.server import run_serve

            return run_serve(args.config)
        if args.command == "push":
            from sipwake.push.cli import run_push

            return run_push(args)
        if args.command == "simulate":
            from sipwake.simulator.cli import run_simulate

            return run_simulate(args)
    except UsageError as exc:
        sys.stderr.write(f"sipwake {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
