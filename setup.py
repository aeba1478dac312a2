"""Build hook: compiles the hot-path modules with mypyc when it can (pyproject.toml holds
the metadata). ``SIPWAKE_PURE_PYTHON=1`` skips compiling; so does a missing C compiler or
missing Python headers. Either way the install succeeds and the ``.py`` modules run; the
build says which once and leaves a record in the package (see sipwake/compiled.py).
"""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "src" / "sipwake"
_compiled = runpy.run_path(str(PACKAGE / "compiled.py"))
HOT_MODULES: tuple[str, ...] = _compiled["HOT_MODULES"]
BUILD_RECORD: str = _compiled["BUILD_RECORD"]
PURE_ENV: str = _compiled["PURE_ENV"]
GROUP = "sipwake.native"  # the shared library: sipwake/native__mypyc.<abi>.so
# Stands for the mypyc extensions until build_ext runs: the other build steps (metadata,
# sdist) must not pay for a mypy run, but the wheel must know it holds extensions.
PLACEHOLDER = Extension("sipwake.native__mypyc", sources=[])


def say(message: str) -> None:
    print(f"sipwake build: {message}", file=sys.stderr, flush=True)


def why_pure() -> str | None:
    """Why compiling is disabled or impossible here, or None when it can be tried."""
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        return f"{PURE_ENV} is set"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0] if cc else 'CC'} not found)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Python.h; install python3-dev)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy)"
    return None


def remove_in_tree_products() -> None:
    """Delete compiled modules an earlier editable build left in src/: they would shadow
    the .py files."""
    for path in glob.glob(str(PACKAGE / "**" / "*.so"), recursive=True):
        os.remove(path)
    (PACKAGE / BUILD_RECORD).unlink(missing_ok=True)


class MypycBuildExt(build_ext):
    """Runs mypyc when the extensions are really built (egg_info finalizes this command
    too: no mypy run there), falls back to pure Python when compiling fails, and records
    the outcome in the package."""

    def run(self) -> None:
        if self.extensions == [PLACEHOLDER]:
            extensions = self._mypycify()
            if extensions:
                # A fresh command object sets up the real extensions; it builds them.
                self.distribution.ext_modules = extensions
                self.reinitialize_command(
                    "build_ext", inplace=self.inplace, editable_mode=self.editable_mode
                )
                self.run_command("build_ext")
            return
        try:
            super().run()
        except Exception as exc:  # the C compiler or linker failed
            self._fall_back(f"C compilation failed: {exc}")
            return
        say(f"compiled: {' '.join(HOT_MODULES)}")
        self._record("native " + " ".join(HOT_MODULES))

    def _mypycify(self) -> list[Extension]:
        from mypyc.build import mypycify

        paths = [f"src/{name.replace('.', '/')}.py" for name in HOT_MODULES]
        say(f"compiling {len(paths)} modules with mypyc (set {PURE_ENV}=1 to skip)")
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)  # mypy reads [tool.mypy] from pyproject.toml here
            # The build environment holds mypy, not sipwake's dependencies: what they
            # provide is typed Any, and modules that are not compiled are not checked.
            options = ["--ignore-missing-imports", "--follow-imports=silent"]
            return list(mypycify([*options, *paths], opt_level="3", group_name=GROUP))
        except (Exception, SystemExit) as exc:  # mypyc exits on type errors
            self._fall_back(f"mypyc failed: {exc!r}")
            return []
        finally:
            os.chdir(cwd)

    def _fall_back(self, why: str) -> None:
        say(f"{why}; installing pure Python")
        if self.inplace or self.editable_mode:
            remove_in_tree_products()
        else:  # what an earlier build left must not go into this wheel
            for path in glob.glob(f"{self.build_lib}/sipwake/**/*.so", recursive=True):
                os.remove(path)
        self._record(f"failed {why}")

    def _record(self, text: str) -> None:
        if self.inplace or self.editable_mode:
            package_dir = PACKAGE
        else:
            package_dir = Path(self.build_lib) / "sipwake"
        package_dir.mkdir(parents=True, exist_ok=True)
        (package_dir / BUILD_RECORD).write_text(text + "\n", encoding="utf-8")

    def get_outputs(self) -> list[str]:
        outputs = list(super().get_outputs())
        if not (self.inplace or self.editable_mode):
            outputs.append(str(Path(self.build_lib) / "sipwake" / BUILD_RECORD))
        return outputs


class SayingBuildPy(build_py):
    """Says once per build (not in every metadata step) why nothing is compiled."""

    def run(self) -> None:
        if reason is not None:
            say(f"{reason}: installing pure Python (not compiled with mypyc)")
        super().run()


reason = why_pure()
if reason is not None:
    remove_in_tree_products()

setup(
    ext_modules=[PLACEHOLDER] if reason is None else [],
    cmdclass={"build_ext": MypycBuildExt, "build_py": SayingBuildPy},
)
