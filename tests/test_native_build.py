"""The mypyc build: what it says it compiled is what runs, and stale compiled code is refused.

``./scripts/test`` installs the package editable, which compiles the hot-path modules next
to their sources; a checkout on PYTHONPATH without a build runs pure Python.
"""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sipwake
from sipwake import compiled


def test_the_modules_the_build_compiled_are_the_ones_imported() -> None:
    record = compiled.build_record()
    if record is None:  # no build in this tree (or SIPWAKE_PURE_PYTHON=1): pure Python
        assert compiled.native_modules() == []
        assert compiled.summary() == "pure Python"
        return
    status, detail = record
    assert status == "native", f"the mypyc build fell back to pure Python: {detail}"
    assert compiled.native_modules() == detail.split()
    assert compiled.summary().startswith("compiled with mypyc: sip.")


def test_version_says_what_runs_compiled() -> None:
    """``--version`` names each module the build compiled, or says pure Python.

    The expectation comes from the files themselves (the build record and the extension
    modules beside the sources), not from the code that writes the line.
    """
    out = subprocess.run(
        [sys.executable, "-m", "sipwake", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    package = Path(sipwake.__file__).parent
    record = package / "_native_build.txt"
    words = record.read_text().split() if record.exists() else []
    built = [
        name
        for name in words[1:]
        if words[0] == "native"
        and any(
            (package.parent / name.replace(".", "/")).with_suffix(suffix).exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
    ]
    prefix = f"sipwake {sipwake.__version__} ("
    assert out.startswith(prefix) and out.endswith(")\n")
    said = out[len(prefix) : -2]
    if not built:
        assert said == "pure Python"
        return
    assert said.startswith("compiled with mypyc: ")
    named = said.removeprefix("compiled with mypyc: ").split(", ")
    assert sorted(named) == sorted(name.removeprefix("sipwake.") for name in built)


def _tree_with_build(tmp_path: Path) -> tuple[Path, Path]:
    """A source tree like an editable install's: pyproject.toml, src/sipwake/ with a
    compiled module's .py and the build record."""
    pkg = tmp_path / "src" / "sipwake"
    (pkg / "sip").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'sipwake'\n")
    shutil.copy(compiled.__file__, pkg / "compiled.py")
    source = pkg / "sip" / "uri.py"
    source.write_text("# the source\n")
    record = pkg / compiled.BUILD_RECORD
    record.write_text("native sipwake.sip.uri\n")
    return source, record


def _check_fresh(tmp_path: Path) -> None:
    runpy.run_path(str(tmp_path / "src" / "sipwake" / "compiled.py"))["check_fresh"]()


def test_a_source_edited_after_the_build_is_refused(tmp_path: Path) -> None:
    source, record = _tree_with_build(tmp_path)
    built = record.stat().st_mtime
    os.utime(source, (built - 10, built - 10))
    _check_fresh(tmp_path)  # built after the last edit: fine

    os.utime(source, (built + 10, built + 10))  # edited after the build
    with pytest.raises(ImportError) as info:
        _check_fresh(tmp_path)
    message = str(info.value)
    assert "older than src/sipwake/sip/uri.py" in message
    assert "python3 -m pip install -e ." in message
    assert f"{compiled.PURE_ENV}=1" in message

    os.utime(record, (built + 20, built + 20))  # rebuilt
    _check_fresh(tmp_path)


def test_installed_packages_and_pure_trees_are_not_checked(tmp_path: Path) -> None:
    source, record = _tree_with_build(tmp_path)
    built = record.stat().st_mtime
    os.utime(source, (built + 10, built + 10))
    (tmp_path / "pyproject.toml").unlink()  # site-packages: install-time stamps
    _check_fresh(tmp_path)

    (tmp_path / "pyproject.toml").write_text("")
    record.unlink()  # no build in this tree: pure Python
    _check_fresh(tmp_path)
