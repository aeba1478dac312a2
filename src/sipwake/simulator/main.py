"""The process behind ``sipwake simulate``: simulators, admin endpoint, state file.

It runs until SIGINT or SIGTERM, prints one line per answered push (tokens shortened, as
they are secrets), and keeps ``state.json`` in the state directory while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from sipwake import eventloop
from sipwake.errors import UsageError
from sipwake.push.request import token_prefix
from sipwake.simulator.admin import AdminServer, add_apns_routes
from sipwake.simulator.apns import (
    DEFAULT_APP,
    ApnsSimulator,
    Environment,
    ListenError,
    Verdict,
)
from sipwake.simulator.extra import ExtraSimulators, add_extra_routes
from sipwake.simulator.state import remove_state, write_state
from sipwake.simulator.tls import PkiError

_TOKEN_RE = re.compile(r"^(?:[0-9a-fA-F]{2}){32,100}$")
_ID_RE = re.compile(r"^[A-Z0-9]{10}$")


def _check_args(args: argparse.Namespace) -> None:
    """Every mistake names its flag (the CLI contract), before anything listens."""
    for flag in (
        "apns_port",
        "apns_dev_port",
        "admin_port",
        "fcm_port",
        "webpush_port",
        "external_port",
    ):
        port = getattr(args, flag)
        if not 0 <= port <= 65535:
            raise UsageError(f"--{flag.replace('_', '-')}: {port} is not a port number")
    for flag in ("reject_token", "expired_token", "bad_token", "dev_token", "prod_token"):
        for token in getattr(args, flag):
            if not _TOKEN_RE.match(token):
                raise UsageError(
                    f"--{flag.replace('_', '-')}: {token_prefix(token)} is not a device token "
                    "(64 or more hexadecimal digits)"
                )
    for flag in ("team_id", "key_id"):
        value = getattr(args, flag)
        if value is not None and not _ID_RE.match(value):
            raise UsageError(f"--{flag.replace('_', '-')}: {value!r} must be 10 letters/digits")
    for flag in ("fail_first", "goaway_after"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 0")
    if args.retry_after is not None and args.retry_after < 0:
        raise UsageError("--retry-after: must be >= 0")
    if not 0 <= args.delay <= 60:
        raise UsageError("--delay: must be between 0 and 60 seconds")
    if not 1 <= args.max_concurrent_streams <= 2**31 - 1:
        raise UsageError("--max-concurrent-streams: must be >= 1")
    if args.token_update_interval is not None and args.token_update_interval < 0:
        raise UsageError("--token-update-interval: must be >= 0")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise UsageError("--idle-timeout: must be > 0 seconds")
    if args.token_limit < 0:
        raise UsageError("--token-limit: must be >= 0")
    if args.token_window <= 0:
        raise UsageError("--token-window: must be > 0 seconds")


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _print_verdict(env: Environment, path: str, verdict: Verdict) -> None:
    token = path.rsplit("/", 1)[-1]
    parts = [_stamp(), "apns", env.value, str(verdict.status)]
    if verdict.push is not None:
        p = verdict.push
        parts += [
            token_prefix(p.token),
            f"topic={p.topic}",
            f"type={p.push_type}",
            f"priority={p.priority}",
            f"auth={p.auth}",
        ]
    else:
        parts += [verdict.reason or "", token_prefix(token) if token else "-"]
    parts.append(f"apns-id={verdict.apns_id}")
    print(" ".join(parts), flush=True)


async def _serve(args: argparse.Namespace, state_dir: Path) -> int:
    try:
        sim = ApnsSimulator(
            state_dir,
            apps=args.app or [DEFAULT_APP],
            team_id=args.team_id,
            key_id=args.key_id,
            host=args.host,
            port=args.apns_port,
            dev_port=args.apns_dev_port,
            max_concurrent_streams=args.max_concurrent_streams,
            token_update_interval=args.token_update_interval,
            require_push_type=args.require_push_type,
            on_verdict=None if args.quiet else _print_verdict,
        )
    except ValueError as exc:
        raise UsageError(f"--app: {exc}") from exc
    sim.set_tokens(
        unregistered=args.reject_token,
        expired=args.expired_token,
        bad=args.bad_token,
        development=args.dev_token,
        production=args.prod_token,
    )
    sim.set_faults(
        fail_first=args.fail_first,
        fail_status=args.fail_status,
        retry_after=args.retry_after,
        goaway_after=args.goaway_after,
        delay=args.delay,
        idle_timeout=args.idle_timeout,
        token_limit=args.token_limit,
        token_window=args.token_window,
    )
    admin = AdminServer(args.host, args.admin_port)
    add_apns_routes(admin.app, sim)
    extra = ExtraSimulators(
        state_dir,
        args.host,
        fcm_port=args.fcm_port,
        webpush_port=args.webpush_port,
        external_port=args.external_port,
        project=args.fcm_project,
    )
    add_extra_routes(admin.app, extra)
    try:
        await sim.start()
    except ListenError as exc:
        flag = "--apns-port" if exc.environment is Environment.PRODUCTION else "--apns-dev-port"
        raise UsageError(f"{flag}: {exc.strerror}") from exc
    except (OSError, PkiError) as exc:
        raise UsageError(f"--state-dir: {exc}") from exc
    try:
        try:
            await extra.start()
        except OSError as exc:
            raise UsageError(
                f"--fcm-port/--webpush-port/--external-port: cannot listen: {exc}"
            ) from exc
        try:
            await admin.start()
        except OSError as exc:
            raise UsageError(f"--admin-port: cannot listen on {args.admin_port}: {exc}") from exc
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "state_dir": str(state_dir),
            "ca_file": str(sim.ca_file),
            "admin_url": admin.url,
            "apns": sim.state(),
            **extra.state(),
        }
        admin.state = state
        # Signals are caught before state.json says we run: a script that waits for it may
        # stop us at once, and that stop must be the clean one (exit status 0).
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        path = write_state(state_dir, state)
        print(
            f"sipwake simulate: APNs production {sim.production_url} sandbox {sim.sandbox_url}"
            f" {extra.summary()} admin {admin.url} state {path}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        remove_state(state_dir)
        with contextlib.suppress(Exception):
            await admin.stop()
        await extra.stop()
        await sim.stop()
    print("sipwake simulate: stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sipwake simulate``; returns the exit status."""
    _check_args(args)
    try:
        # The loop `sipwake serve` runs on (uvloop unless SIPWAKE_EVENT_LOOP=asyncio).
        return eventloop.run(_serve(args, Path(args.state_dir).absolute()))
    except KeyboardInterrupt:  # pragma: no cover - signals are handled in the loop
        return 130
    except BrokenPipeError:  # stdout closed by the reader
        sys.stderr.close()
        return 0
