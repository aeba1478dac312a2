"""``sipwake serve``: wires configuration, listeners and the push engine together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from sipwake.api.app import make_app
from sipwake.config import Config, ConfigError, load_config

log = logging.getLogger("sipwake")


def split_host_port(value: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) from the config, or a ConfigError naming ``key``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _bound_port(site: web.TCPSite, asked: int) -> int:
    """The port really bound (``asked`` may be 0, meaning any free port)."""
    server = site._server
    sockets = getattr(server, "sockets", None)
    return int(sockets[0].getsockname()[1]) if sockets else asked


class Server:
    """The running server: start() binds every listener, stop() releases them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._runner: web.AppRunner | None = None
        self._ready = False
        self.http_port: int | None = None

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if cfg.http.listen:
            host, port = split_host_port(cfg.http.listen, "[http] listen")
            self._runner = web.AppRunner(make_app(lambda: self._ready), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, port)
            await site.start()
            self.http_port = _bound_port(site, port)
            log.info("HTTP API listening on %s:%s", host, self.http_port)
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve(config: Config) -> None:
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def install_fast_loop() -> None:
    """Use uvloop where it is installed: it halves the per-packet cost of asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_serve(config_path: str | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        sys.stderr.write(f"sipwake serve: error: {exc}\n")
        return 2
    setup_logging(config.server.log_level)
    install_fast_loop()
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:
        sys.stderr.write(f"sipwake serve: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"sipwake serve: error: cannot listen: {exc.strerror or exc}\n")
        return 1
    return 0
