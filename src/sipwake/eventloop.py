"""The event loop `sipwake serve` and `sipwake simulate` run on: uvloop when it is installed.

uvloop (libuv) runs the loop, its timers and the socket transports in C: a UDP datagram in
and an answer out cost no Python-level loop iteration, handle or transport code.
``SIPWAKE_EVENT_LOOP=asyncio`` forces asyncio's own loop (to rule uvloop out when a problem
is suspected in it, or to compare the two); ``uvloop`` insists on uvloop (an error when it
is missing); unset, empty or ``auto``: uvloop if importable, else asyncio.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

from sipwake.errors import UsageError

ENV = "SIPWAKE_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def choose_loop() -> tuple[str, LoopFactory | None]:
    """(name, factory) of the loop to run, from ``SIPWAKE_EVENT_LOOP``.

    The factory is None for asyncio's own loop: ``asyncio.Runner`` then does exactly what
    ``asyncio.run`` does. A value that is not a choice is a UsageError naming the variable,
    not a silent fallback: an operator who set it wants to know it was not taken.
    """
    raw = os.environ.get(ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in CHOICES:
        raise UsageError(f"{ENV}: expected {', '.join(CHOICES)}, got {raw!r}")
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(f"{ENV}=uvloop: uvloop is not installed") from None
        return "asyncio", None
    return _uvloop_name(uvloop), uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``choose_loop`` picks."""
    try:
        _, factory = choose_loop()
    except UsageError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """What ``loop`` is, for the start-up log line: ``uvloop 0.23.0`` or ``asyncio``.

    Read from the running loop itself, so the line says what runs, not what was asked.
    """
    if type(loop).__module__.partition(".")[0] == "uvloop":
        import uvloop

        return _uvloop_name(uvloop)
    return "asyncio"


def _uvloop_name(module: ModuleType) -> str:
    # uvloop's stubs do not export __version__, though the package defines it.
    return f"uvloop {getattr(module, '__version__', '(unknown version)')}"
