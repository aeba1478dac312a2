"""The simulator behind ``sipwake simulate`` (being built)."""

from __future__ import annotations

import argparse

from sipwake.errors import UsageError


def run(args: argparse.Namespace) -> int:
    raise UsageError("the simulator is not built yet")
