"""Which modules run compiled with mypyc, and a guard against stale compiled code.

``pip install .`` compiles the hot-path modules listed in :data:`HOT_MODULES` with mypyc
(setup.py reads the list from here), unless ``SIPWAKE_PURE_PYTHON=1`` is set or no C
compiler is found; the pure-Python modules are installed either way. The build leaves a
record next to the package (:data:`BUILD_RECORD`) saying what it compiled, or why not.

An extension module shadows the ``.py`` file of the same name, so in a source tree (an
editable install) editing a ``.py`` after the build would run the old compiled code.
:func:`check_fresh` (called when ``sipwake`` is imported) refuses that with a clear error.
This module stays interpreted: it must import nothing but the standard library.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    # mypyc knows the decorator by this name; it is not needed at run time.
    from mypy_extensions import mypyc_attr as mypyc_attr
else:
    _C = TypeVar("_C")

    def mypyc_attr(*_flags: str, **_settings: object) -> Callable[[_C], _C]:
        """``@mypyc_attr`` for the compiled modules, without mypy_extensions at run time:
        mypyc reads the decorator when it compiles, interpreted it changes nothing."""
        return lambda cls: cls


# Modules compiled by the build, chosen by measurement (docs/benchmarks.md).
HOT_MODULES: tuple[str, ...] = (
    "sipwake.sip.uri",
    "sipwake.sip.headers",
    "sipwake.sip.message",
    "sipwake.sip.transaction",
    "sipwake.sip.transport",
    "sipwake.push.params",
    "sipwake.proxy.registrar",
    "sipwake.sip.endpoint",
    "sipwake.proxy.core",
)

# Written by the build next to this file: "native <module>..." when it compiled,
# "pure <reason>" when compiling was disabled or impossible, "failed <reason>" when the
# compiler was there but the build fell back to pure Python.
BUILD_RECORD = "_native_build.txt"

PURE_ENV = "SIPWAKE_PURE_PYTHON"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class StaleBuildError(ImportError):
    """A compiled module in a source tree is older than its ``.py`` file."""


def build_record() -> tuple[str, str] | None:
    """(status, detail) from the build record, or None when the build left none."""
    try:
        with open(os.path.join(_PACKAGE_DIR, BUILD_RECORD), encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    status, _, detail = text.partition(" ")
    return status, detail


def is_native(module_name: str) -> bool:
    """True when ``module_name`` imports as an extension module (compiled)."""
    module = importlib.import_module(module_name)
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def native_modules() -> list[str]:
    """The hot-path modules that run compiled in this process (imports them)."""
    return [name for name in HOT_MODULES if is_native(name)]


def summary() -> str:
    """One phrase for logs and ``--version``: what runs compiled."""
    native = native_modules()
    if not native:
        return "pure Python"
    short = ", ".join(name.removeprefix("sipwake.") for name in native)
    return f"compiled with mypyc: {short}"


def check_fresh() -> None:
    """Refuse to run compiled modules older than their source (source trees only).

    Cheap: one ``stat`` when the tree has no build record (pure Python, the usual case for
    a worktree on PYTHONPATH), otherwise one read and a ``stat`` per compiled module.
    Installed packages are not checked: there the files carry install-time stamps.
    """
    record_path = os.path.join(_PACKAGE_DIR, BUILD_RECORD)
    try:
        built_at = os.stat(record_path).st_mtime
    except FileNotFoundError:
        return
    root = os.path.dirname(os.path.dirname(_PACKAGE_DIR))
    if not os.path.exists(os.path.join(root, "pyproject.toml")):
        return
    record = build_record()
    if record is None or record[0] != "native":
        return
    base = os.path.dirname(_PACKAGE_DIR)
    stale = []
    for name in record[1].split():
        source = os.path.join(base, *name.split(".")) + ".py"
        try:
            if os.stat(source).st_mtime > built_at:
                stale.append(os.path.relpath(source, root))
        except FileNotFoundError:
            stale.append(os.path.relpath(source, root))
    if stale:
        raise StaleBuildError(
            f"sipwake: the compiled modules in {base} are older than {', '.join(stale)}; "
            f"rebuild them with `python3 -m pip install -e .` (./scripts/test does), or "
            f"remove them with `{PURE_ENV}=1 python3 -m pip install -e .` to run pure Python"
        )
