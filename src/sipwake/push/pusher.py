"""The pusher behind ``sipwake push`` (being built)."""

from __future__ import annotations

import argparse

from sipwake.cli import UsageError


def run(args: argparse.Namespace) -> int:
    raise UsageError("sending pushes is not built yet")
