"""Shared fixtures: free ports on 127.0.0.1 and running sipwake as a real process."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.store.redis_server import RedisServer


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports below the kernel's ephemeral range: outgoing connections of other processes never
# take them between our check and the server's bind (which made "address already in use"
# failures when a port chosen by bind(0) was then wanted for TCP too).
_PORT_LOW = 20000
_PORT_HIGH = max(_PORT_LOW + 1000, min(_ephemeral_start(), 32768))
_handed_out: set[int] = set()
_rng = random.SystemRandom()  # conftest may be imported twice (as conftest and tests.conftest)


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1, free for both TCP and UDP a moment ago, not handed out before
    in this run (SIP listens on one port for both; ``kind`` is kept for readability)."""
    del kind
    for _ in range(1000):
        port = _rng.randrange(_PORT_LOW, _PORT_HIGH)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


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

    def start(
        extra_toml: str = "",
        sip_port: int | None = None,
        env: Mapping[str, str | None] | None = None,
        more_listen: Sequence[str] = (),
    ) -> ServeProcess:
        """``env``: variables to set in the process's environment (None: to remove);
        ``more_listen``: listening points besides UDP and TCP on ``sip_port``."""
        http_port = free_port()
        sip_port = sip_port or free_port(socket.SOCK_DGRAM)
        config = tmp_path / f"sipwake-{len(started)}.toml"
        listen = [f"udp://127.0.0.1:{sip_port}", f"tcp://127.0.0.1:{sip_port}", *more_listen]
        text = (
            f'[server]\ndata-dir = "data"\n[http]\nlisten = "127.0.0.1:{http_port}"\n'
            f"[sip]\nlisten = {json.dumps(listen)}\n"
        )
        config.write_text(text + extra_toml)
        environ = dict(os.environ)
        for name, value in (env or {}).items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        proc = subprocess.Popen(
            [sys.executable, "-m", "sipwake", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environ,
        )
        sp = ServeProcess(proc, http_port, config)
        started.append(sp)
        wait_http_ok(f"http://127.0.0.1:{http_port}/health", proc)
        return sp

    yield start
    for sp in started:
        sp.stop()


def pytest_report_header() -> str:
    """Which tree is tested and whether its hot path runs compiled (mypyc) or pure Python."""
    import sipwake
    from sipwake import compiled

    return f"sipwake: {Path(sipwake.__file__).parent}, {compiled.summary()}"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which the test may kill, restart or pause."""
    from tests.store.redis_server import RedisServer  # it imports this module

    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()
