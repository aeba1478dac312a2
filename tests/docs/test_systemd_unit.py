"""contrib/sipwake.service starts the real CLI, on the documented configuration, hardened."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from sipwake.cli import build_parser
from sipwake.config import parse_config

from .harness import DOCS, ROOT, blocks

UNIT = ROOT / "contrib" / "sipwake.service"


def unit() -> dict[str, list[str]]:
    """Key -> values of the unit (systemd allows a key to repeat)."""
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def exec_start() -> list[str]:
    [command] = unit()["ExecStart"]
    return shlex.split(command)


def test_exec_start_is_a_valid_sipwake_serve_command() -> None:
    argv = exec_start()
    assert Path(argv[0]).name == "sipwake" and Path(argv[0]).is_absolute()
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    config = Path(args.config)
    [conf_dir] = unit()["ConfigurationDirectory"]
    assert config.parent == Path("/etc") / conf_dir


def test_the_documented_configuration_fits_the_unit() -> None:
    """operations.md's production file is the unit's --config, and its data-dir is the
    unit's state folder (the only folder ProtectSystem=strict leaves writable)."""
    config_path = exec_start()[exec_start().index("--config") + 1]
    [block] = [b for b in blocks(DOCS / "operations.md") if b.markers.get("example") == config_path]
    config = parse_config(tomllib.loads(block.text))
    [state_dir] = unit()["StateDirectory"]
    assert Path(config.server.data_dir) == Path("/var/lib") / state_dir
    [workdir] = unit()["WorkingDirectory"]
    assert Path(workdir) == Path("/var/lib") / state_dir
    for key_path in (config.sip.tls_cert, config.sip.tls_key, config.apple.key_file):
        assert Path(key_path).is_relative_to(Path("/etc") / unit()["ConfigurationDirectory"][0])


def test_the_unit_is_hardened() -> None:
    u = unit()
    assert u.get("User") == ["sipwake"] or u.get("DynamicUser") == ["yes"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }.items():
        assert u.get(key) == [value], key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
@pytest.mark.timeout(60)
def test_systemd_analyze_verify_accepts_it(tmp_path: Path) -> None:
    """systemd's own check, with ExecStart pointed at the installed sipwake."""
    sipwake = shutil.which("sipwake")
    assert sipwake is not None
    text = UNIT.read_text(encoding="utf-8").replace(exec_start()[0], sipwake)
    copy = tmp_path / "sipwake.service"
    copy.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
