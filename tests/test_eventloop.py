"""sipwake.eventloop: which loop `serve`, `simulate` and the REGISTER bench run on."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from sipwake import eventloop
from sipwake.errors import UsageError


async def running_loop() -> str:
    return eventloop.describe(asyncio.get_running_loop())


@pytest.mark.parametrize("value", [None, "", "auto", " UVLOOP "])
def test_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(eventloop.ENV, raising=False)
    else:
        monkeypatch.setenv(eventloop.ENV, value)
    name, factory = eventloop.choose_loop()
    assert name == f"uvloop {uvloop.__version__}" and factory is uvloop.new_event_loop
    assert eventloop.run(running_loop()) == name


def test_asyncio_when_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.choose_loop() == ("asyncio", None)
    assert eventloop.run(running_loop()) == "asyncio"


def test_an_unknown_value_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(eventloop.ENV, "tokio")
    coro = running_loop()
    with pytest.raises(UsageError, match=r"^SIPWAKE_EVENT_LOOP: expected auto, uvloop, asyncio"):
        eventloop.run(coro)
    assert coro.cr_frame is None  # closed, not left to warn "never awaited"


def test_asyncio_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(eventloop.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert eventloop.choose_loop() == ("asyncio", None)


def test_uvloop_asked_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(UsageError, match=r"^SIPWAKE_EVENT_LOOP=uvloop: uvloop is not installed$"):
        eventloop.choose_loop()
