"""Shared fixtures: free ports on 127.0.0.1 and running sipwake as a real process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the process died."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode}: {out}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)  # polling a readiness endpoint, not synchronising on time
    raise AssertionError(f"{url} did not answer 200 within {deadline}s")


class ServeProcess:
    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, config: Path) -> None:
        self.proc = proc
        self.http_port = http_port
        self.config = config

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """Start ``sipwake serve`` with extra TOML text; yields a starter function."""
    started: list[ServeProcess] = []

    def start(extra_toml: str = "", sip_port: int | None = None) -> ServeProcess:
        http_port = free_port()
        sip_port = sip_port or free_port(socket.SOCK_DGRAM)
        config = tmp_path / f"sipwake-{len(started)}.toml"
        text = (
            f'[server]\ndata-dir = "data"\n[http]\nlisten = "127.0.0.1:{http_port}"\n'
            f'[sip]\nlisten = ["udp://127.0.0.1:{sip_port}", "tcp://127.0.0.1:{sip_port}"]\n'
        )
        config.write_text(text + extra_toml)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        sp = ServeProcess(proc, http_port, config)
        started.append(sp)
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", proc)
        return sp

    yield start
    for sp in started:
        sp.stop()
