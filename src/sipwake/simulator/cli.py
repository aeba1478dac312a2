"""``sipwake simulate``: local look-alikes of APNs (and later FCM and Web Push)."""

from __future__ import annotations

import argparse


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--apns-port", type=int, default=0, help="APNs port (0 = any free)")
    p.add_argument(
        "--state-dir",
        default="./sipwake-sim",
        metavar="DIR",
        help="where the CA, keys and state.json are written",
    )
    p.add_argument(
        "--reject-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 410 Unregistered for this token (repeatable)",
    )
    p.add_argument(
        "--bad-token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="answer 400 BadDeviceToken for this token (repeatable)",
    )
    p.add_argument(
        "--fail-first", type=int, default=0, metavar="N", help="answer the first N pushes with 503"
    )
    p.add_argument(
        "--goaway-after",
        type=int,
        default=0,
        metavar="N",
        help="send GOAWAY after N streams on each connection",
    )


def run_simulate(args: argparse.Namespace) -> int:
    from sipwake.simulator.main import run

    return run(args)
