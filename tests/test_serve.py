"""`sipwake serve` as a user runs it: starts, reports health, refuses bad config."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import sipwake
from sipwake import compiled


def test_serve_reports_health(serve: Any) -> None:
    sp = serve()
    with urllib.request.urlopen(f"http://127.0.0.1:{sp.http_port}/health") as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"status": "ok"}
    assert sp.stop() == 0
    # Operators see in the first line whether the hot path runs compiled (mypyc).
    log = sp.proc.stdout.read().decode()
    first = log.splitlines()[0]
    assert first.endswith(f"sipwake {sipwake.__version__} starting ({compiled.summary()})")


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
