"""``sipwake serve``: wires configuration, listeners and the push engine together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys

from aiohttp import web

from sipwake import __version__
from sipwake.api.app import ApiContext, ApiServer
from sipwake.api.webhook import RejectedTokenWebhook
from sipwake.compiled import summary as build_summary
from sipwake.config import Config, ConfigError, load_config
from sipwake.eventloop import describe as describe_loop
from sipwake.eventloop import run as run_on_chosen_loop
from sipwake.proxy.auth import Authenticator
from sipwake.proxy.core import ProxyCore
from sipwake.proxy.registrar import Registrar
from sipwake.proxy.router import Router
from sipwake.push.apps import AppRegistry, default_providers
from sipwake.push.service import PushService
from sipwake.sip.endpoint import Endpoint, OptionsUser, TransactionUser
from sipwake.sip.tls import server_context
from sipwake.sip.transaction import TimerConfig
from sipwake.sip.transport import TransportConfig
from sipwake.store import Store, StoreError, open_store

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


SIP_SCHEMES = ("udp", "tcp", "tls", "ws", "wss")


def parse_sip_listen(value: str) -> tuple[str, str, int]:
    """``udp://host:port`` (tcp, tls, ws, wss too) into (transport, host, port), naming the key."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in SIP_SCHEMES:
        raise ConfigError(
            f"[sip] listen: expected udp://, tcp://, tls://, ws:// or wss://host:port, "
            f"got {value!r}"
        )
    host, port = split_host_port(rest, "[sip] listen")
    return scheme.upper(), host, port


def make_sip_endpoint(config: Config, tu: TransactionUser | None = None) -> Endpoint:
    """The SIP endpoint with the configured timers and limits, and ``tu`` (the proxy core;
    the OPTIONS-only TU when none is given)."""
    sip = config.sip
    timers = TimerConfig(t1=sip.t1 / 1000, t2=sip.t2 / 1000, t4=sip.t4 / 1000)
    limits = TransportConfig(
        max_message_size=sip.max_message_size,
        idle_timeout=float(sip.idle_timeout),
        max_connections=sip.max_connections,
        max_connections_per_ip=sip.max_connections_per_ip,
    )
    return Endpoint(tu or OptionsUser(), timers=timers, transport_config=limits)


class Server:
    """The running server: start() binds every listener, stop() releases them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.api: ApiServer | None = None
        self._ready = False
        self.http_port: int | None = None
        self.sip: Endpoint | None = None
        #: Bound SIP listening points, e.g. {"udp": 5060, "tcp": 5060} (real ports).
        self.sip_ports: dict[str, int] = {}
        self.store: Store | None = None
        self.apps: AppRegistry | None = None
        self.push: PushService | None = None
        self._webhook: RejectedTokenWebhook | None = None
        self.registrar: Registrar | None = None
        self.core: ProxyCore | None = None
        self.router: Router | None = None

    async def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        context = await self._start_push()
        await self._start_sip()
        if cfg.http.listen:
            host, port = split_host_port(cfg.http.listen, "[http] listen")
            context.sip_counters = self._sip_counters
            self.api = ApiServer(context)
            self.http_port = await self.api.start(host, port)
            log.info("HTTP API listening on %s:%s", host, self.http_port)
        self._ready = True

    async def _start_sip(self) -> None:
        cfg = self.config
        points = [parse_sip_listen(value) for value in cfg.sip.listen]
        tls_ctx = None
        secure = [t for t, _, _ in points if t in ("TLS", "WSS")]
        if secure:
            if not cfg.sip.tls_cert or not cfg.sip.tls_key:
                scheme = secure[0].lower()
                raise ConfigError(
                    f"[sip] tls-cert: a {scheme}:// listener needs tls-cert and tls-key"
                )
            try:
                tls_ctx = server_context(
                    cfg.resolve_path(cfg.sip.tls_cert), cfg.resolve_path(cfg.sip.tls_key)
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"[sip] tls-cert: cannot load certificate: {exc}") from None
        if not points:
            return
        assert self.store is not None and self.push is not None
        auth = Authenticator(cfg)
        self.registrar = Registrar(cfg, self.store, push=self.push, auth=auth)
        # The router subscribes itself to the registrar's binding events.
        self.router = Router(cfg, self.registrar, push=self.push)
        self.core = ProxyCore(cfg, self.registrar, self.router, auth)
        self.sip = make_sip_endpoint(cfg, self.core)
        self.router.attach(self.sip)
        self.registrar.start()
        await self.router.start()
        for transport, host, port in points:
            bound = await self.sip.listen(transport, host, port, tls_ctx)
            self.sip_ports.setdefault(transport.lower(), bound)
            log.info("SIP listening on %s://%s:%s", transport.lower(), host, bound)

    async def _start_push(self) -> ApiContext:
        """The store, app registry and push service behind the HTTP API."""
        cfg = self.config
        try:
            self.store = await open_store(cfg)
        except StoreError as exc:
            raise ConfigError(f"[storage] url: cannot open the store: {exc}") from None
        self.apps = AppRegistry(cfg, self.store)
        await self.apps.load()
        self.push = PushService(
            default_providers(cfg),
            max_queue_size=cfg.push.max_queue_size,
            lookup=self.apps.provider_for,
        )
        if cfg.http.rejected_token_webhook:
            self._webhook = RejectedTokenWebhook(cfg.http.rejected_token_webhook)
            self.push.add_token_rejected_listener(self._webhook)
        return ApiContext(
            push=self.push,
            registry=self.apps,
            store=self.store,
            http=cfg.http,
            ready=lambda: self._ready,
        )

    def _sip_counters(self) -> dict[str, float]:
        """The registrar's, router's and transports' counters for /metrics (empty without
        SIP)."""
        out: dict[str, float] = {}
        router = self.core.router if self.core is not None else None
        transports = self.sip.transports if self.sip is not None else None
        sources = (("registrar", self.registrar), ("router", router), ("transport", transports))
        for prefix, source in sources:
            stats = getattr(source, "stats", None)
            if stats:
                out.update({f"{prefix}_{name}_total": float(n) for name, n in stats.items()})
        return out

    async def _stop_push(self) -> None:
        if self.router is not None:
            await self.router.aclose()
            self.router = None
        if self.registrar is not None:
            await self.registrar.aclose()
            self.registrar = None
        if self._webhook is not None:
            await self._webhook.aclose()
            self._webhook = None
        if self.push is not None:
            await self.push.aclose()
            self.push = None
        if self.apps is not None:
            await self.apps.aclose()
            self.apps = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def stop(self) -> None:
        self._ready = False
        if self.sip is not None:
            await self.sip.close()
            self.sip = None
        if self.api is not None:
            await self.api.close()
            self.api = None
        await self._stop_push()


def tune_gc() -> None:
    """Fewer garbage-collector passes for a server that keeps many live transactions.

    Every UDP transaction lives 32 s (Timer J); at thousands of requests per second the
    default thresholds make the collector rescan them over and over. Objects alive after
    start-up are frozen out of the scans; nearly everything else is freed by refcount.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1_000)


async def serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    log.info(
        "sipwake %s starting (%s; event loop: %s)",
        __version__,
        build_summary(),
        describe_loop(loop),
    )
    # SIGTERM and SIGINT are caught before anything listens: once /health says 200 a
    # supervisor may stop us at any moment, and that stop must be the clean one.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    await server.start()
    tune_gc()
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


def run_serve(config_path: str | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        sys.stderr.write(f"sipwake serve: error: {exc}\n")
        return 2
    setup_logging(config.server.log_level)
    try:
        # uvloop unless SIPWAKE_EVENT_LOOP=asyncio (sipwake.eventloop); a bad value is a
        # UsageError, reported by the CLI as one line with exit status 2.
        run_on_chosen_loop(serve(config))
    except ConfigError as exc:
        sys.stderr.write(f"sipwake serve: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"sipwake serve: error: cannot listen: {exc.strerror or exc}\n")
        return 1
    return 0
