"""`sipwake serve` driven by SIPp, as an operator checks a SIP server before going live."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

SIPP = shutil.which("sipp")
SCENARIOS = Path(__file__).parent / "sipp"

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) is not installed")


def run_sipp(scenario: str, port: int, transport: str, calls: int, rate: int) -> tuple[int, str]:
    """Run a bounded SIPp client; returns its exit status and final statistics screen."""
    assert SIPP is not None
    proc = subprocess.run(
        [
            SIPP,
            "-sf",
            str(SCENARIOS / scenario),
            f"127.0.0.1:{port}",
            "-t",
            transport,
            "-i",
            "127.0.0.1",
            "-p",
            str(free_port(socket.SOCK_DGRAM if transport == "u1" else socket.SOCK_STREAM)),
            "-m",
            str(calls),
            "-r",
            str(rate),
            "-timeout",
            "30s",
            "-timeout_error",
            "-nostdin",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def counter(screen: str, name: str) -> int:
    """The cumulative column of a SIPp statistics line such as 'Successful call'."""
    match = re.search(rf"{name}\s*\|\s*\d+\s*\|\s*(\d+)", screen)
    assert match, f"no {name!r} line in SIPp output:\n{screen[-2000:]}"
    return int(match.group(1))


@pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])
def test_sipp_options_all_answered(serve: Any, transport: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    sp = serve(sip_port=port)
    code, screen = run_sipp("options_uac.xml", port, transport, calls=200, rate=100)
    assert code == 0, screen[-3000:]
    assert counter(screen, "Successful call") == 200
    assert counter(screen, "Failed call") == 0
    assert sp.stop() == 0


def test_sipp_invite_is_rejected_and_the_ack_stops_retransmissions(serve: Any) -> None:
    # bob has no binding: 100 Trying, then 480; a 480 retransmitted after SIPp's ACK
    # (the ACK not matched to the INVITE server transaction) fails the call.
    port = free_port(socket.SOCK_DGRAM)
    serve(sip_port=port)
    code, screen = run_sipp("invite_480_uac.xml", port, "u1", calls=20, rate=50)
    assert code == 0, screen[-3000:]
    assert counter(screen, "Successful call") == 20
