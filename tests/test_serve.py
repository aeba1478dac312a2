"""`sipwake serve` as a user runs it: starts, reports health, refuses bad config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import uvloop

import sipwake
from sipwake import compiled, eventloop


def test_serve_reports_health(serve: Any) -> None:
    sp = serve()
    with urllib.request.urlopen(f"http://127.0.0.1:{sp.http_port}/health") as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok"}
    assert sp.stop() == 0
    # Operators see in the first line whether the hot path runs compiled (mypyc).
    log = sp.proc.stdout.read().decode()
    first = log.splitlines()[0]
    assert f"sipwake {sipwake.__version__} starting ({compiled.summary()}; event loop: " in first


@pytest.mark.parametrize(
    ("setting", "loop"),
    [(None, f"uvloop {uvloop.__version__}"), ("asyncio", "asyncio"), ("uvloop", "uvloop ")],
)
def test_serve_runs_on_uvloop_unless_told_asyncio(
    serve: Any, setting: str | None, loop: str
) -> None:
    """uvloop by default (the loop and UDP transport in C); SIPWAKE_EVENT_LOOP=asyncio
    forces asyncio's loop. The start-up line names the loop that really runs, and the
    process serves and stops cleanly (SIGTERM) on either."""
    sp = serve(env={eventloop.ENV: setting})
    with urllib.request.urlopen(f"http://127.0.0.1:{sp.http_port}/health") as resp:
        assert resp.status == 200
    assert sp.stop() == 0
    first = sp.proc.stdout.read().decode().splitlines()[0]
    said = first.rpartition("; event loop: ")[2]
    assert said.startswith(loop) and said.endswith(")")


def test_serve_refuses_an_unknown_event_loop(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata-dir = "{tmp_path / "data"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, eventloop.ENV: "tokio"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "sipwake serve: error: SIPWAKE_EVENT_LOOP: expected auto, uvloop, asyncio, got 'tokio'"
    )


def test_serve_refuses_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[router]\nfork-lat = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sipwake serve: error: [router] fork-lat: unknown key"
