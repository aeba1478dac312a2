"""A real ``redis-server`` for the tests: own temp dir, free 127.0.0.1 port, stopped by PID.

It runs with ``appendonly yes`` and ``appendfsync always``, the settings docs/cluster.md
requires for "nothing acknowledged is lost", so the restart tests test those settings.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

CONFIG = """\
bind 127.0.0.1
port {port}
dir {dir}
daemonize no
protected-mode yes
logfile {dir}/redis.log
save ""
appendonly yes
appendfsync always
aof-use-rdb-preamble no
"""


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs Debian's redis-server)")
    return path


class RedisServer:
    """One redis-server process; :meth:`kill` and :meth:`start` again keep port and data."""

    def __init__(self, folder: Path, extra: str = "") -> None:
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        conf = self.dir / "redis.conf"
        conf.write_text(CONFIG.format(port=self.port, dir=self.dir) + self.extra)
        self.proc = subprocess.Popen(
            [redis_binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.wait_ready()

    def wait_ready(self, deadline: float = 20.0) -> None:
        """Poll PING until Redis answers PONG (it loads its AOF first)."""
        assert self.proc is not None
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self.ping():
                return
            time.sleep(0.02)  # polling readiness, not synchronising on time
        raise AssertionError(f"redis-server on port {self.port} did not start")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def cli(self, *args: str) -> str:
        """Run a redis-cli command against this server (for test inspection only)."""
        out = subprocess.run(
            [redis_binary("redis-cli"), "-p", str(self.port), *args],
            capture_output=True,
            check=True,
            timeout=10,
        )
        return out.stdout.decode().strip()

    def stored_bytes(self) -> bytes:
        """Everything Redis keeps on disk (the append-only files)."""
        return b"".join(
            p.read_bytes()
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and (p.suffix in (".aof", ".rdb") or "appendonly" in p.name)
        )


class SentinelServer(RedisServer):
    """A redis-sentinel (``redis-server --sentinel``) monitoring one primary as ``name``."""

    def __init__(self, folder: Path, primary_port: int, name: str = "primary") -> None:
        super().__init__(folder)
        self.primary_port = primary_port
        self.name = name

    def start(self) -> None:
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir}/redis.log\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.primary_port} 1\n"
        )
        self.proc = subprocess.Popen(
            [redis_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()
