"""``state.json``: how users' staging and cross-process tests find a running simulator.

The file lists URLs, the CA and credential paths and ids. It is written atomically (a
reader never sees half a file) once every listener is up, and removed on a clean stop so
that a stale file never points at ports that are gone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
STATE_VERSION = 1


def state_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / STATE_FILE


def write_state(state_dir: Path | str, data: dict[str, Any]) -> Path:
    """Write ``state.json`` atomically; returns its path."""
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": STATE_VERSION, **data}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_state(state_dir: Path | str) -> dict[str, Any]:
    """The state of a running simulator; raises FileNotFoundError when none runs."""
    data = json.loads(state_path(state_dir).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{state_path(state_dir)}: not a JSON object")
    return data


def remove_state(state_dir: Path | str) -> None:
    state_path(state_dir).unlink(missing_ok=True)
