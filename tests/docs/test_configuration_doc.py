"""docs/configuration.md is the schema's own output: regenerate it and compare."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sipwake import docgen
from sipwake.config import AppSection, Config, parse_config

from .harness import ROOT

DOC = ROOT / "docs" / "configuration.md"


def test_the_committed_reference_matches_the_schema() -> None:
    assert DOC.read_text(encoding="utf-8") == docgen.render(), (
        "docs/configuration.md drifted from src/sipwake/config.py: run python3 -m sipwake.docgen"
    )


def test_every_key_of_the_schema_is_documented_with_its_default() -> None:
    text = DOC.read_text(encoding="utf-8")
    config = Config()
    for name, attr in docgen.SECTIONS.items():
        section = getattr(config, attr)
        for key, f in docgen.section_keys(type(section)):
            default = docgen._toml_value(getattr(section, f.name)).replace("|", "\\|")
            assert f"| `{key}` |" in text and f"`{default}`" in text, f"[{name}] {key}"
    for key, _ in docgen.section_keys(AppSection):
        assert f"| `{key}` |" in text


def test_the_defaults_block_is_the_default_config() -> None:
    """The generated "every key" block loads to exactly the built-in defaults."""
    import tomllib

    [block] = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert parse_config(tomllib.loads(block)) == Config()


def test_flexisip_mapping_names_only_real_sipwake_keys() -> None:
    keys = docgen.schema_keys()
    named = [skey for _, _, skey, _ in docgen.FLEXISIP_KEYS if skey]
    assert named and all(k in keys for k in named), [k for k in named if k not in keys]
    modules = {m for m, _, _, _ in docgen.FLEXISIP_KEYS}
    assert modules == {"module::PushNotification", "module::Router", "module::Registrar"}


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(docgen.render().replace("data-dir", "data-folder"), encoding="utf-8")
    assert docgen.main(["--check", "--output", str(stale)]) == 1
    assert docgen.main(["--output", str(stale)]) == 0
    assert docgen.main(["--check", "--output", str(stale)]) == 0


@pytest.mark.timeout(60)
def test_the_generator_runs_as_documented() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sipwake.docgen", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
