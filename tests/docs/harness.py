"""Extracts the fenced code blocks of docs/*.md and README.md and runs them.

Rules (written once here, so that every page of the guide follows them):

* ```` ```sh ```` blocks run as shell, in order, in one bash process per page, in a fresh
  temporary directory, with ``sipwake`` and ``python3`` of this interpreter first on PATH.
  A failing command fails the test (``set -e``).
* ```` ```console ```` blocks: lines starting with ``$ `` are commands (a trailing ``\\``
  or an open quote continues one); the other lines are the output shown, each of which
  must appear in what the commands print (``…`` stands for any text). A command must
  exit 0 unless the block is marked ``<!-- exit: N -->``.
* ```` ```toml ```` blocks are loaded with sipwake's own loader. Marked
  ``<!-- file: NAME -->`` they are also written to NAME in the page's directory at that
  point of the run, for the commands after them.
* Other blocks marked ``<!-- file: NAME -->`` (a script the commands then run) are
  written the same way. Any other block needs ``<!-- not-tested: why -->`` right above it.

So that a page can show the real defaults (SIP on 5060, HTTP on 8080, fixed simulator
ports) while the test runs beside other tests, every port written as ``127.0.0.1:PORT`` or
``--…-port PORT`` is mapped to a free port for the run, consistently across the page, and a
bare ``sipwake serve`` gets a configuration that only moves its listeners to those ports.
Processes the page starts must be stopped by the page: the run is a process group, and
whatever is still alive at its end is killed and fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import sipwake
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

FENCE = re.compile(r"^([ \t]*)```([\w-]*)[^\n]*\n(.*?)^\1```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*([\w-]+):\s*(.*?)\s*-->")
PORT_PATTERNS = (
    re.compile(r"(?<=127\.0\.0\.1:)(\d{2,5})\b"),
    re.compile(r"(?<=-port )(\d{2,5})\b"),
    re.compile(r"(?<=-port=)(\d{2,5})\b"),
)
WILD = "…"
RUN_TIMEOUT = 120.0


@dataclass
class Block:
    """One fenced block with the markers written just above it."""

    page: Path
    line: int
    lang: str
    text: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n \t").rsplit("\n\n", 1)[-1]
        markers = {name: value for name, value in MARKER.findall(before)}
        line = text.count("\n", 0, m.start()) + 1
        body = textwrap.dedent(m[3]) if m[1] else m[3]
        found.append(Block(page, line, m[2], body, markers))
    return found


def port_map(texts: list[str]) -> dict[str, str]:
    """A free port for each port the page names, all distinct.

    They come from the tests' common :func:`free_port`: below the kernel's ephemeral range
    and never handed out twice in a run. A port picked with ``bind(0)`` is in that range,
    where any other ``bind(0)`` or unbound socket on the machine may be given it in the
    seconds before the page's server binds it (pages run longer under load, beside more
    tests), and two picks of one page could even be the same port.
    """
    ports = {"5060", "8080"}
    for text in texts:
        for pattern in PORT_PATTERNS:
            ports.update(pattern.findall(text))
    return {port: str(free_port()) for port in sorted(ports)}


def remap(text: str, ports: dict[str, str]) -> str:
    for pattern in PORT_PATTERNS:
        text = pattern.sub(lambda m: ports.get(m[1], m[1]), text)
    return text


BARE_SERVE = re.compile(r"\bsipwake serve\b(?![^\n]*--config)")


@dataclass
class Command:
    block: Block
    command: str
    expected: list[str]
    exit_status: int


def _open_quote(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


def console_commands(block: Block) -> list[Command]:
    """Commands of a console block, each with the output lines shown after it."""
    commands: list[Command] = []
    status = int(block.markers.get("exit", "0"))
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            parts = [line[2:]]
            while (parts[-1].endswith("\\") or _open_quote("\n".join(parts))) and i + 1 < len(
                lines
            ):
                i += 1
                parts.append(lines[i])
            commands.append(Command(block, "\n".join(parts), [], status))
        elif line.strip():
            if not commands:
                raise AssertionError(f"{block.where}: output before any command")
            commands[-1].expected.append(line.strip())
        i += 1
    return commands


def output_matches(expected: str, output: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in expected.split(WILD))
    return any(re.search(pattern, line) for line in output.splitlines())


@dataclass
class PageRun:
    returncode: int
    log: str
    leftover: bool
    failures: list[str]


def run_page(page: Path, workdir: Path | None = None) -> PageRun:
    """Run every sh/console block of a page, in order, and check console output."""
    page_blocks = blocks(page)
    ports = port_map([b.text for b in page_blocks])
    work = Path(workdir or tempfile.mkdtemp(prefix="sipwake-doc-"))
    harness = work / ".doctest"
    harness.mkdir(parents=True, exist_ok=True)
    defaults = work / ".doctest-defaults.toml"
    defaults.write_text(
        "[sip]\n"
        f'listen = ["udp://127.0.0.1:{ports["5060"]}", "tcp://127.0.0.1:{ports["5060"]}"]\n'
        "[http]\n"
        f'listen = "127.0.0.1:{ports["8080"]}"\n',
        encoding="utf-8",
    )
    script = ["set -e"]
    commands: list[Command] = []
    for block in page_blocks:
        text = remap(block.text, ports)
        script.append(f"echo '@@ {block.where}' >&2")
        if block.lang == "sh":
            script.append(BARE_SERVE.sub(f"sipwake serve --config {defaults}", text))
        elif block.lang == "console":
            for cmd in console_commands(block):
                n = len(commands)
                commands.append(cmd)
                run = BARE_SERVE.sub(
                    f"sipwake serve --config {defaults}", remap(cmd.command, ports)
                )
                script += [
                    "set +e",
                    "{",
                    run,
                    f'}} > "{harness}/out.{n}" 2>&1; echo $? > "{harness}/rc.{n}"',
                    "set -e",
                ]
        elif "file" in block.markers:
            name = block.markers["file"]
            served = re.search(rf"sipwake serve --config {re.escape(name)}\b", page.read_text())
            listens = tomllib.loads(block.text) if block.lang == "toml" else {}
            if served and not (
                "listen" in listens.get("sip", {}) and "listen" in listens.get("http", {})
            ):
                raise AssertionError(
                    f"{block.where}: a file given to sipwake serve must spell out [sip] and "
                    "[http] listen, so that the test can move them to free ports"
                )
            script.append(f"cat > '{name}' <<'DOCTEST_EOF'\n{text}DOCTEST_EOF")
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    # The page runs the sipwake this test run imports (a checkout's src/, even when another
    # tree is the one installed), and nothing else of the test's environment.
    env["PYTHONPATH"] = str(Path(sipwake.__file__).resolve().parents[1])
    # Output goes to a file, not a pipe: a process the page leaves running must not keep
    # the run waiting for the end of its output.
    log_path = harness / "log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", "\n".join(script) + "\n"],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            text = log_path.read_text(errors="replace")
            return PageRun(-1, text + "\n[timed out]", True, [])
    leftover = _kill_group(proc.pid)
    out = log_path.read_bytes()
    failures: list[str] = []
    for n, cmd in enumerate(commands):
        rc_file = harness / f"rc.{n}"
        if not rc_file.exists():
            continue
        rc = int(rc_file.read_text().strip() or "0")
        output = (harness / f"out.{n}").read_text(errors="replace")
        if rc != cmd.exit_status:
            failures.append(
                f"{cmd.block.where}: `{cmd.command}` exited {rc}, not {cmd.exit_status}:\n{output}"
            )
        for line in cmd.expected:
            if not output_matches(remap(line, ports), output):
                failures.append(
                    f"{cmd.block.where}: `{cmd.command}` did not print {line!r}; it printed:\n"
                    f"{output}"
                )
    return PageRun(proc.returncode, out.decode(errors="replace"), leftover, failures)


def _kill_group(pgid: int) -> bool:
    """Kill what is left of the page's process group; True when something was left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not our group
        return False
    os.killpg(pgid, signal.SIGKILL)
    return True
