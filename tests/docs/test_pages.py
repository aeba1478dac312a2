"""Every command and configuration snippet of the guide runs, so the guide cannot rot.

The rules are in ``harness.py``: sh and console blocks run in order in a fresh folder,
console output is compared, TOML loads with sipwake's loader, anything else says why not.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sipwake.config import ConfigError, load_config

from .harness import ROOT, Block, blocks, output_matches, pages, port_map, run_page

#: Pages whose examples another test runs (it starts the servers they need); the blocks
#: there must still be of a known kind, and their TOML still loads here.
TESTED_ELSEWHERE = {
    "docs/http-api.md": "tests/api/test_docs.py",
}
RUN = ("sh", "console")
LOADED = ("toml",)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def all_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks(page)]


def test_every_block_is_run_loaded_or_says_why() -> None:
    unexplained = []
    for block in all_blocks():
        if block.lang in RUN + LOADED or "not-tested" in block.markers:
            continue
        if "file" in block.markers and _file_is_used(block):
            continue
        if _rel(block.page) in TESTED_ELSEWHERE:
            continue
        unexplained.append(f"{block.where} ```{block.lang}")
    assert not unexplained, "blocks neither run nor marked <!-- not-tested: why -->"


def _file_is_used(block: Block) -> bool:
    """A file block counts as tested when a later command of its page uses the file."""
    later = [b for b in blocks(block.page) if b.line > block.line and b.lang in RUN]
    return any(block.markers["file"] in b.text for b in later)


def test_pages_tested_elsewhere_have_their_test() -> None:
    for page, test in TESTED_ELSEWHERE.items():
        assert (ROOT / page).exists(), page
        assert (ROOT / test).exists(), test


def test_not_tested_blocks_are_few_and_say_why() -> None:
    marked = [b for b in all_blocks() if "not-tested" in b.markers]
    assert all(len(b.markers["not-tested"]) >= 10 for b in marked)
    assert len(marked) <= 6, [b.where for b in marked]


@pytest.mark.parametrize("block", [b for b in all_blocks() if b.lang == "toml"], ids=str)
def test_toml_block_loads(block: Block, tmp_path: Path) -> None:
    path = tmp_path / block.markers.get("file", "sipwake.toml")
    path.write_text(block.text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        pytest.fail(f"{block.where}: {exc}")
    # Relative paths resolve against the file's folder, as documented.
    assert config.data_dir.is_absolute()


def _runnable_pages() -> list[Path]:
    return [
        p
        for p in pages()
        if _rel(p) not in TESTED_ELSEWHERE and any(b.lang in RUN for b in blocks(p))
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", _runnable_pages(), ids=_rel)
def test_page_commands_run(page: Path, tmp_path: Path) -> None:
    run = run_page(page, tmp_path)
    assert run.returncode == 0, f"a command of {_rel(page)} failed:\n{run.log}"
    assert not run.failures, "\n\n".join(run.failures)
    assert not run.leftover, f"{_rel(page)} left a process running:\n{run.log}"


def test_page_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    """A page's servers get ports no other socket of the machine is handed meanwhile: the
    kernel gives ``bind(0)`` and outgoing sockets ports of its ephemeral range only."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    ports = port_map([text])
    assert {"5060", "5061", "8080", "8090", "8443", "8444"} <= set(ports)
    chosen = [int(p) for p in ports.values()]
    assert len(set(chosen)) == len(chosen)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(0 < p < low for p in chosen), chosen


def test_output_wildcards() -> None:
    """The ``…`` wildcard matches any text but the rest must be there, in order."""
    assert output_matches("1 push … and 0 failed.", "1 push notification(s) sent, and 0 failed.")
    assert not output_matches("1 push … and 0 failed.", "1 push notification(s), 1 failed.")
    assert not output_matches("a…b", "b a")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    broken = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)} -> {target}")
                continue
            if anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{_rel(page)} -> {target} (no such heading)")
    assert not broken, broken


def test_readme_set_up_commands_exist() -> None:
    """The README's two set-up commands (indented, run by hand and by CI) name real things:
    the quick start starts from them."""
    import os
    import tomllib

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [line[4:] for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ["python3 -m pip install . && sipwake serve", "./scripts/test"]
    assert os.access(ROOT / "scripts" / "test", os.X_OK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["sipwake"] == "sipwake.cli:main"
    from sipwake.cli import build_parser

    assert build_parser().parse_args(["serve"]).config is None


def test_the_harness_catches_wrong_output_failures_and_leftovers(tmp_path: Path) -> None:
    """The guard itself can fail: wrong output, a wrong exit status, a server left running."""
    page = tmp_path / "page.md"
    page.write_text(
        "```console\n$ echo hello 127.0.0.1:8080\nhello 127.0.0.1:8080\n$ echo bye\nhello\n```\n\n"
        "<!-- exit: 3 -->\n```console\n$ false\n```\n\n"
        "```sh\nsleep 60 &\n```\n",
        encoding="utf-8",
    )
    run = run_page(page, tmp_path / "work")
    assert run.returncode == 0
    assert len(run.failures) == 2, run.failures
    assert "did not print 'hello'" in run.failures[0]
    assert "exited 1, not 3" in run.failures[1]
    assert run.leftover


def test_the_harness_stops_at_a_failing_command(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```sh\nfalse\necho not reached\n```\n", encoding="utf-8")
    run = run_page(page, tmp_path / "work")
    assert run.returncode != 0 and "not reached" not in run.log
