"""The cluster store: every sipwake node of a cluster shares one Redis (or a Sentinel set).

Each change is one Lua script, so the registrar's rules hold across nodes without locks
(see :mod:`sipwake.store.redis_scripts` for the key layout). Redis keeps the data:

- bindings expire server-side (the AOR hash lives until its last binding expires, plus a
  grace), so Redis forgets dead registrations even when no node is running;
- held messages and credentials stay until delivered, expired or deleted; an operation
  returns (and sipwake answers 200/202) only after Redis executed it, and with
  ``appendonly yes`` + ``appendfsync always`` Redis has written it to its log by then
  (docs/cluster.md says what ``everysec`` loses instead);
- every registration is published on ``<prefix>events``, so the node holding a call for
  that AOR learns that the callee registered through another node (:meth:`watch_bindings`).

Faults: a Redis that is restarting, unreachable or read-only (a failover under way) makes
an operation raise :class:`~sipwake.store.base.StoreUnavailable` within the socket
timeouts, never hang. Input Redis cannot be given (text with a lone surrogate that no
bytes give) is a :class:`ValueError` of that call alone, and a script's error goes to its
own caller: the writes sent in the same batch are not affected. Writes are not retried
blindly (a retry after a lost reply could apply a REGISTER twice and then refuse it as
stale): the SIP client retries after 503.
Connections are re-established on the next call.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from sipwake.push.request import token_prefix
from sipwake.store import redis_scripts as lua
from sipwake.store.base import NotFound, StaleBinding, StoreConflict, StoreError, StoreUnavailable
from sipwake.store.crypto import SecretBox
from sipwake.store.model import (
    App,
    Binding,
    Credential,
    HeldMessage,
    Page,
    RejectedToken,
    UpsertResult,
    check_app,
    check_credential,
    check_page,
    credential_aad,
    public_credential,
    token_hash,
    wire_bytes,
)

log = logging.getLogger("sipwake.store")

T = TypeVar("T")

DEFAULT_PREFIX = "sipwake:"
#: How long Redis keeps a binding or message past its expiry before forgetting it itself:
#: room for the nodes' own sweep to see it expire and tell the router.
GRACE_MS = 120_000
#: Entries one expiry or wake-up script looks at: bounds how long it holds Redis.
BATCH = 500
#: Defaults that make an unreachable Redis an error within seconds, not a hang.
SOCKET_TIMEOUT = 2.0
CONNECT_TIMEOUT = 1.0
RETRY_AFTER = 5
#: Writes per pipeline: bounds one batch's time on the wire and in Redis.
MAX_WRITE_BATCH = 512
#: Connections per node (the write pipeline uses one; reads share the rest).
MAX_CONNECTIONS = 64
#: Seconds without an answer after which a write batch is preceded by a PING.
IDLE_CHECK = 0.25
#: How text goes to Redis (and :func:`_text` reads it back): what the SIP parser kept from
#: bytes that were not UTF-8 (lone surrogates ``\udc80``-``\udcff``) goes back to those
#: bytes, in script arguments and in the keys of direct commands alike.
TEXT_ERRORS = "surrogateescape"

BindingListener = Callable[[str, Binding], None]

_UNAVAILABLE = (
    rexc.ConnectionError,  # includes BusyLoadingError: Redis is loading its data
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # a replica: the primary changed and Sentinel is catching up
    rexc.MasterDownError,
    rexc.TryAgainError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A parsed ``redis://``, ``rediss://`` or ``redis+sentinel://`` URL."""

    url: str  # for redis:// and rediss://: what redis-py's from_url reads
    prefix: str = DEFAULT_PREFIX
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    password: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_redis_url(url: str) -> RedisUrl:
    """Read a Redis store URL; raises :class:`ValueError` naming what is wrong.

    ``redis://[:password@]host:port/db`` (``rediss://`` for TLS) names one Redis;
    ``redis+sentinel://[:password@]host:port[,host:port…]/service[/db]`` a primary found
    through Sentinel. ``?prefix=name:`` changes the key prefix (``sipwake:``), so several
    sipwake clusters may share a Redis.
    """
    base, _, query = url.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    prefix = options.pop("prefix", DEFAULT_PREFIX)
    if not prefix or any(c.isspace() for c in prefix):
        raise ValueError(f"prefix: expected a non-empty key prefix without spaces, got {prefix!r}")
    if base.startswith(("redis://", "rediss://", "unix://")):
        rest = base.split("://", 1)[1]
        if not rest.strip("/"):
            raise ValueError(f"expected redis://host:port/db, got {url!r}")
        full = base + ("?" + urlencode(options) if options else "")
        return RedisUrl(full, prefix, options=options)
    if not base.startswith("redis+sentinel://"):
        raise ValueError(f"expected redis://, rediss:// or redis+sentinel://, got {url!r}")
    rest = base[len("redis+sentinel://") :]
    auth, at, hosts_path = rest.rpartition("@")
    password = unquote(auth.partition(":")[2]) or None if at else None
    hosts, _, path = hosts_path.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError(
            f"expected redis+sentinel://host:port[,host:port]/service[/db], got {url!r}"
        )
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"sentinel {item!r}: expected host:port")
        sentinels.append((host.strip("[]"), int(port)))
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"database: expected a number, got {parts[1]!r}")
        db = int(parts[1])
    return RedisUrl("", prefix, tuple(sentinels), unquote(parts[0]), db, password, options=options)


def _connect(target: RedisUrl) -> Any:
    """A client that fails fast (no blind retries) and reconnects on the next call."""
    kwargs: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 5,
        "encoding_errors": TEXT_ERRORS,
    }
    for name, default in (
        ("socket_timeout", SOCKET_TIMEOUT),
        ("socket_connect_timeout", CONNECT_TIMEOUT),
    ):
        if name not in target.options:
            kwargs[name] = default
    if not target.sentinels:
        # A bounded pool whose callers wait for a free connection (up to the socket
        # timeout) instead of failing: hundreds of REGISTERs in flight share it.
        pool = aioredis.BlockingConnectionPool.from_url(
            target.url,
            max_connections=MAX_CONNECTIONS,
            timeout=kwargs.get("socket_timeout", SOCKET_TIMEOUT),
            **kwargs,
        )
        return aioredis.Redis(connection_pool=pool)
    for name in ("socket_timeout", "socket_connect_timeout"):
        if name in target.options:
            kwargs[name] = float(target.options[name])
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": kwargs["socket_timeout"],
            "socket_connect_timeout": kwargs["socket_connect_timeout"],
        },
        **kwargs,
    )
    master: aioredis.Redis = sentinel.master_for(
        target.service, db=target.db, password=target.password, max_connections=256
    )
    return master


def _error(exc: Exception) -> Exception:
    """The store's exception for a redis-py one."""
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"Redis unavailable: {exc}", RETRY_AFTER)
    text = str(exc)
    for mark, cls in (("STALE ", StaleBinding), ("CONFLICT ", StoreConflict)):
        if text.startswith(mark):
            return cls(text[len(mark) :])
    if text.startswith("NOTFOUND "):
        return NotFound(text[len("NOTFOUND ") :])
    if isinstance(exc, rexc.ResponseError) and text.startswith("OOM"):
        return StoreError(f"Redis is out of memory: {text}")
    return StoreError(f"Redis error: {text}")


def _encode(value: object) -> bytes:
    """One script argument as Redis gets it. Encoded in the caller's task, so that input
    Redis cannot be given fails that call alone (ValueError) instead of the whole batch,
    or the flusher, at send time."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return wire_bytes(value)  # the TEXT_ERRORS encoding
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"cannot store a {type(value).__name__}: expected text or bytes")


class _Write(NamedTuple):
    """A queued write: its script, its encoded ARGV, and the future its caller awaits."""

    source: str
    argv: list[bytes]
    fut: asyncio.Future[Any]


def _fail(writes: Iterable[_Write], error: Exception) -> None:
    for w in writes:
        if not w.fut.done():
            w.fut.set_exception(error)


def _batch_error(exc: Exception) -> Exception:
    """The store's exception for a failure of a whole batch (not of one script in it)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, rexc.RedisError):
        return _error(exc)
    if isinstance(exc, OSError):
        return StoreUnavailable(f"Redis unavailable: {exc}", RETRY_AFTER)
    # A bug here or in redis-py: its callers hear of it, and the flusher goes on.
    log.error("Redis write batch failed", exc_info=exc)
    return StoreError(f"Redis write failed: {type(exc).__name__}: {exc}")


class _Redis:
    """The client, the scripts and the calls with error mapping, shared by the stores.

    Writes go through one queue: whatever callers queued while the previous batch was on
    the wire goes out as the next pipeline, in call order, on one connection. Redis runs
    them in that order (held MESSAGEs keep their arrival order), and with ``appendfsync
    always`` one fsync covers the whole batch, as group commit does for SQLite.

    Every queued caller is answered, whatever happens: its result, the error of its own
    script (the others of the batch still get theirs), or the batch's error (Redis
    unavailable, the flusher cancelled); input Redis cannot take fails before queueing.
    """

    def __init__(self, client: Any, prefix: str) -> None:
        # redis-py's annotations mix sync and async return types: typed loosely here.
        self.client: Any = client
        self.prefix = prefix
        self._scripts: dict[str, Any] = {}
        self._prefix_arg = _encode(prefix)
        self._queue: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None
        # Set when Redis was seen failing: the next write batch first checks, with a PING
        # on a fresh connection, that Redis is back (pooled connections may be dead).
        self._suspect = False
        self._last_ok = 0.0  # time.monotonic() of the last batch Redis answered
        self.batches = 0  # pipelines sent (benchmarks show how writes were grouped)

    async def run(self, make: Callable[[], Awaitable[T]], *, idempotent: bool = False) -> T:
        """Await ``make()``; a read (``idempotent``) gets one more try on a fresh connection.

        A pooled connection may have died with a Redis restart; the first call on it fails
        and redis-py drops it, so one retry of a read reaches the restarted Redis.
        """
        for attempt in (0, 1):
            try:
                return await make()
            except rexc.RedisError as exc:
                mapped = _error(exc)
                if isinstance(mapped, StoreUnavailable) and idempotent and attempt == 0:
                    await self.lost()
                    continue
                raise mapped from None
            except OSError as exc:
                if idempotent and attempt == 0:
                    await self.lost()
                    continue
                raise StoreUnavailable(f"Redis unavailable: {exc}", RETRY_AFTER) from None
        raise AssertionError("unreachable")

    async def script(
        self, source: str, args: Iterable[str | bytes], *, idempotent: bool = False
    ) -> Any:
        """Run a script now, on its own connection (reads)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        argv = [self._prefix_arg, *map(_encode, args)]
        return await self.run(lambda: script(keys=[], args=argv), idempotent=idempotent)

    async def write(self, source: str, args: Iterable[str | bytes]) -> Any:
        """Run a script in the next write batch; returns once Redis executed it. Also for a
        frequent read that must see this node's earlier writes (it costs no round trip).

        Raises ValueError, queueing nothing, for an argument Redis cannot be given."""
        argv = [self._prefix_arg, *map(_encode, args)]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Write(source, argv, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        batch: list[_Write] = []
        try:
            while self._queue:
                batch = [w for w in self._queue[:MAX_WRITE_BATCH] if not w.fut.done()]
                del self._queue[:MAX_WRITE_BATCH]
                if not batch:  # every caller of these was cancelled
                    continue
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug: its callers hear of it, the next batch goes
                    _fail(batch, _batch_error(exc))
        except BaseException:
            # Cancelled (the event loop is stopping): the writes still queued were never
            # sent; their callers hear so instead of waiting for a flusher that is gone.
            queued, self._queue = self._queue, []
            _fail(batch, StoreError("Redis write interrupted: the store is shutting down"))
            _fail(queued, StoreError("Redis write not sent: the store is shutting down"))
            raise

    async def lost(self) -> None:
        """Redis went away: close the idle pooled connections, which died with it."""
        self._suspect = True
        with contextlib.suppress(rexc.RedisError, OSError):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def _send(self, batch: list[_Write]) -> None:
        """Run one batch and answer each of its callers; raises only when cancelled."""
        results = await self._attempt(batch, self._checked_pipeline)
        if results is None:
            return
        self.batches += 1
        self._last_ok = time.monotonic()
        missing = self._settle(batch, results, rerun=True)
        if not missing:
            return
        # Redis does not have these scripts (first use, or its cache was emptied by a
        # restart): load each once, then run those writes again, in their order.
        loaded = await self._attempt(missing, self._load)
        if loaded is None:
            return
        runnable = []
        for w, error in zip(missing, loaded, strict=True):
            if error is None:
                runnable.append(w)
            else:
                _fail([w], _error(error))
        if runnable:
            results = await self._attempt(runnable, self._pipeline)
            if results is not None:
                self._settle(runnable, results, rerun=False)

    async def _attempt(
        self, writes: list[_Write], step: Callable[[list[_Write]], Awaitable[list[Any]]]
    ) -> list[Any] | None:
        """``await step(writes)``; on failure, every caller of ``writes`` gets the error
        and the result is None, so the flusher goes on with the next batch."""
        try:
            return await step(writes)
        except asyncio.CancelledError:
            _fail(
                writes,
                StoreError(
                    "Redis write interrupted (the store is shutting down): "
                    "it may or may not have been applied"
                ),
            )
            raise
        except Exception as exc:
            error = _batch_error(exc)
            _fail(writes, error)
            if isinstance(error, StoreUnavailable):
                await self.lost()
            return None

    def _settle(self, writes: list[_Write], results: list[Any], *, rerun: bool) -> list[_Write]:
        """Answer each caller with its script's result or error; returns, unanswered, the
        writes Redis had no script for (NOSCRIPT) when ``rerun``."""
        missing = []
        for w, result in zip(writes, results, strict=True):
            if w.fut.done():  # its caller was cancelled
                continue
            if rerun and isinstance(result, rexc.NoScriptError):
                missing.append(w)
            elif isinstance(result, Exception):
                w.fut.set_exception(_error(result))
            else:
                w.fut.set_result(result)
        return missing

    async def _checked_pipeline(self, batch: list[_Write]) -> list[Any]:
        if self._suspect or time.monotonic() - self._last_ok > IDLE_CHECK:
            # A connection idle for a while may have died with a Redis restart: a PING
            # (retried once on a fresh connection) finds out before a write is at stake.
            await self.run(lambda: self.client.ping(), idempotent=True)
            self._suspect = False
        return await self._pipeline(batch)

    async def _pipeline(self, batch: list[_Write]) -> list[Any]:
        """Each write's reply or error, in order (a failure of the whole batch raises)."""
        # MULTI/EXEC: Redis runs (and with appendfsync always, fsyncs) the batch as one,
        # instead of once per 16 KB it happens to read of a plain pipeline.
        async with self.client.pipeline(transaction=True) as pipe:
            for w in batch:
                pipe.evalsha(_sha(w.source), 0, *w.argv)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _load(self, writes: list[_Write]) -> list[Exception | None]:
        """Load the scripts of ``writes``; per write, None or why its script did not load
        (it does not compile: an error for those writes alone)."""
        errors: dict[str, Exception] = {}
        for source in dict.fromkeys(w.source for w in writes):
            try:
                await self.client.script_load(source)
            except rexc.ResponseError as exc:
                if isinstance(exc, _UNAVAILABLE):
                    raise
                errors[source] = exc
        return [errors.get(w.source) for w in writes]

    async def aclose(self) -> None:
        """Let queued writes finish, then close the connections."""
        if self._flusher is not None:
            # Shielded: a close that is given up on (cancelled) must not cancel the batch
            # on the wire, whose callers would then never be answered.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        await self.client.aclose()


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _binding_json(b: Binding) -> bytes:
    """A binding's JSON as bytes: text the SIP parser kept from bytes that were not UTF-8
    (a Latin-1 User-Agent or display name, as lone surrogates) goes back to those bytes.
    cjson passes them through (it rejects the ``\\udcXX`` escapes that would be the JSON
    for them) and :func:`_text` gives them back as they came."""
    return _encode(_dumps(b.to_json()))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", TEXT_ERRORS) if isinstance(value, bytes) else value


def _binding(value: bytes | str) -> Binding:
    """A binding from ``"<seq> <JSON>"`` as stored."""
    text = _text(value)
    return Binding.from_json(json.loads(text[text.index(" ") + 1 :]))


def _sorted_bindings(values: Iterable[bytes | str]) -> list[Binding]:
    pairs = []
    for value in values:
        text = _text(value)
        seq, _, data = text.partition(" ")
        pairs.append((int(seq), data))
    pairs.sort(key=lambda p: p[0])
    return [Binding.from_json(json.loads(data)) for _, data in pairs]


class RedisBindings:
    """:class:`~sipwake.store.base.BindingStore` on Redis."""

    def __init__(self, r: _Redis, node: str) -> None:
        self._r = r
        self._node = node

    async def get(self, aor: str, now: float | None = None) -> list[Binding]:
        key = self._r.prefix + "b:" + aor
        raw: dict[bytes, bytes] = await self._r.run(
            lambda: self._r.client.hgetall(key),
            idempotent=True,
        )
        found = _sorted_bindings(raw.values())
        if now is not None:
            found = [b for b in found if b.expires_at > now]
        return found

    async def upsert(self, binding: Binding, max_push_devices: int = 5) -> UpsertResult:
        if binding.expires_at <= binding.registered_at:
            raise ValueError("expires_at: a binding must expire after it was registered")
        b = binding
        reply = await self._r.write(
            lua.UPSERT,
            [
                b.aor,
                b.key,
                b.device,
                repr(float(b.registered_at)),
                repr(float(b.expires_at)),
                b.call_id,
                str(b.cseq),
                _binding_json(b),
                str(max_push_devices),
                str(GRACE_MS),
                self._node,
                b.push_key or "",
            ],
        )
        previous, replaced, evicted, expired, current = reply
        return UpsertResult(
            previous=_binding(previous) if previous else None,
            replaced=_sorted_bindings(replaced),
            evicted=_sorted_bindings(evicted),
            expired=_sorted_bindings(expired),
            bindings=_sorted_bindings(current),
        )

    async def remove(self, aor: str, key: str) -> list[Binding]:
        reply = await self._r.write(lua.REMOVE, [aor, key, "0"])
        return _sorted_bindings(reply)

    async def remove_all(self, aor: str) -> list[Binding]:
        reply = await self._r.write(lua.REMOVE, [aor, "", "1"])
        return _sorted_bindings(reply)

    async def remove_by_push_token(self, provider: str, token: str) -> list[Binding]:
        reply = await self._r.write(lua.REMOVE_BY_TOKEN, [provider, token])
        return _sorted_bindings(reply)

    async def expire(self, now: float) -> list[Binding]:
        gone: list[Binding] = []
        while True:
            values, looked = await self._r.write(
                lua.EXPIRE_BINDINGS, [repr(float(now)), str(BATCH)]
            )
            gone += _sorted_bindings(values)
            if looked < BATCH:
                return gone

    async def due_for_wakeup(self, now: float, threshold_percent: float) -> list[Binding]:
        fraction = repr(threshold_percent / 100.0)
        values: list[bytes] = []
        offset = 0
        while True:
            due, looked = await self._r.script(
                lua.DUE_FOR_WAKEUP,
                [repr(float(now)), fraction, str(offset), str(BATCH)],
                idempotent=True,
            )
            values += due
            offset += looked
            if looked < BATCH:
                return _sorted_bindings(values)

    async def count(self) -> int:
        key = self._r.prefix + "exp"
        result: int = await self._r.run(lambda: self._r.client.zcard(key), idempotent=True)
        return result


def _held(fields: list[bytes]) -> HeldMessage:
    h = {_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
    target = h.get("target")
    return HeldMessage(
        aor=_text(h["aor"]),
        request=bytes(h["request"]),
        received_at=float(h["received_at"]),
        expires_at=float(h["expires_at"]),
        target=_text(target) if target is not None else None,
        id=_text(h["id"]),
        sequence=int(h["seq"]),
    )


class RedisMessages:
    """:class:`~sipwake.store.base.MessageStore` on Redis."""

    def __init__(self, r: _Redis) -> None:
        self._r = r

    async def add(self, message: HeldMessage) -> str:
        if not isinstance(message.request, bytes | bytearray) or not message.request:
            raise ValueError("request: the held MESSAGE must be non-empty bytes")
        mid = message.id or uuid.uuid4().hex
        # The id is chosen here, so adding again after a lost reply stores nothing twice.
        reply = await self._r.write(
            lua.ADD_MESSAGE,
            [
                mid,
                message.aor,
                message.target or "",
                "0" if message.target is None else "1",
                bytes(message.request),
                repr(float(message.received_at)),
                repr(float(message.expires_at)),
                str(GRACE_MS),
            ],
        )
        return _text(reply)

    async def pending(self, aor: str, now: float | None = None) -> list[HeldMessage]:
        # In the write batch rather than on a connection of its own: every REGISTER reads
        # here (another node may have held MESSAGEs for the AOR), and riding the batch of
        # REGISTER upserts under way spares it a round trip. Redis still runs it after the
        # writes this node queued before it, so it sees the binding just stored.
        reply = await self._r.write(lua.PENDING_MESSAGES, [aor])
        held = [_held(h) for h in reply]
        if now is not None:
            held = [m for m in held if m.expires_at > now]
        return held

    async def delete(self, message_id: str) -> bool:
        return bool(await self._r.write(lua.DELETE_MESSAGE, [message_id]))

    async def expire(self, now: float) -> list[HeldMessage]:
        gone: list[HeldMessage] = []
        while True:
            held, looked = await self._r.write(lua.EXPIRE_MESSAGES, [repr(now), str(BATCH)])
            gone += [_held(h) for h in held]
            if looked < BATCH:
                gone.sort(key=lambda m: m.sequence)
                return gone

    async def count(self, aor: str | None = None) -> int:
        key = self._r.prefix + ("mexp" if aor is None else "ma:" + aor)
        result: int = await self._r.run(lambda: self._r.client.zcard(key), idempotent=True)
        return result


_PUBLIC_FIELDS = (
    "key_id",
    "team_id",
    "bundle_id",
    "project_id",
    "cert_subject",
    "cert_expires_at",
    "created_at",
    "updated_at",
)


def _public_json(c: Credential) -> str:
    return _dumps({name: getattr(c, name) for name in _PUBLIC_FIELDS})


def _credential(cid: str, alias: bytes, ctype: bytes, public: bytes) -> Credential:
    return Credential(alias=_text(alias), type=_text(ctype), id=cid, **json.loads(public))


class RedisCredentials:
    """:class:`~sipwake.store.base.CredentialStore` on Redis; secrets sealed by SecretBox."""

    def __init__(self, r: _Redis, box: SecretBox, now: Callable[[], float]) -> None:
        self._r = r
        self._box = box
        self._now = now

    async def add(self, credential: Credential) -> Credential:
        check_credential(credential)
        if not credential.secret:
            raise ValueError("secret: a new credential needs its secret")
        cid = credential.id or uuid.uuid4().hex
        now = self._now()
        stored = public_credential(credential, cid, now, now)
        sealed = self._box.encrypt(credential_aad(cid), credential.secret)
        await self._r.write(
            lua.ADD_CREDENTIAL, [cid, stored.alias, stored.type, _public_json(stored), sealed]
        )
        return stored

    async def _fields(self, cid: str, *names: str) -> list[bytes | None]:
        key = self._r.prefix + "c:" + cid
        got: list[bytes | None] = await self._r.run(
            lambda: self._r.client.hmget(key, list(names)),
            idempotent=True,
        )
        return got

    async def get(self, credential_id: str) -> Credential | None:
        alias, ctype, public = await self._fields(credential_id, "alias", "type", "public")
        if alias is None or ctype is None or public is None:
            return None
        return _credential(credential_id, alias, ctype, public)

    async def get_secret(self, credential_id: str) -> bytes:
        (sealed,) = await self._fields(credential_id, "secret")
        if sealed is None:
            raise NotFound(f"credential {credential_id} not found")
        return self._box.decrypt(credential_aad(credential_id), bytes(sealed))

    async def list(
        self,
        type: str | None = None,
        alias: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Credential]:
        check_page(offset, limit)
        items = [
            c
            for c in await self._all()
            if (type is None or c.type == type) and (alias is None or c.alias == alias)
        ]
        return Page(items[offset : offset + limit], len(items), offset, limit)

    async def _all(self) -> builtins.list[Credential]:
        client, prefix = self._r.client, self._r.prefix

        async def read() -> list[Credential]:
            ids = [_text(i) for i in await client.zrange(prefix + "cs", 0, -1)]
            async with client.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.hmget(prefix + "c:" + cid, ["alias", "type", "public"])
                rows = await pipe.execute()
            return [_credential(cid, *row) for cid, row in zip(ids, rows, strict=True) if row[0]]

        return await self._r.run(read, idempotent=True)

    async def update(self, credential: Credential) -> Credential:
        check_credential(credential)
        cid = credential.id
        current = await self.get(cid)
        if current is None:
            raise NotFound(f"credential {cid} not found")
        stored = public_credential(credential, cid, current.created_at, self._now())
        sealed = (
            self._box.encrypt(credential_aad(cid), credential.secret) if credential.secret else b""
        )
        await self._r.write(
            lua.UPDATE_CREDENTIAL,
            [
                cid,
                stored.alias,
                stored.type,
                _public_json(stored),
                "1" if sealed else "0",
                sealed,
            ],
        )
        return stored

    async def delete(self, credential_id: str) -> bool:
        return bool(await self._r.write(lua.DELETE_CREDENTIAL, [credential_id]))


def _app(aid: str, name: bytes, provider: bytes, data: bytes) -> App:
    return App(name=_text(name), provider=_text(provider), id=aid, **json.loads(data))


def _app_data(app: App) -> str:
    return _dumps(
        {
            "app_ids": list(app.app_ids),
            "credential_ids": list(app.credential_ids),
            "created_at": app.created_at,
            "updated_at": app.updated_at,
        }
    )


class RedisApps:
    """:class:`~sipwake.store.base.AppStore` on Redis."""

    def __init__(self, r: _Redis, now: Callable[[], float]) -> None:
        self._r = r
        self._now = now

    async def _save(self, mode: str, app: App) -> None:
        await self._r.write(
            lua.SAVE_APP,
            [
                mode,
                app.id,
                app.name,
                app.provider,
                _app_data(app),
                str(len(app.app_ids)),
                *app.app_ids,
                *dict.fromkeys(app.credential_ids),
            ],
        )

    async def add(self, app: App) -> App:
        check_app(app)
        now = self._now()
        stored = App(
            name=app.name,
            provider=app.provider,
            app_ids=list(app.app_ids),
            credential_ids=list(app.credential_ids),
            id=app.id or uuid.uuid4().hex,
            created_at=now,
            updated_at=now,
        )
        await self._save("add", stored)
        return stored

    async def get(self, app_id: str) -> App | None:
        key = self._r.prefix + "a:" + app_id
        row: list[bytes | None] = await self._r.run(
            lambda: self._r.client.hmget(key, ["name", "provider", "data"]),
            idempotent=True,
        )
        name, provider, data = row
        if name is None or provider is None or data is None:
            return None
        return _app(app_id, name, provider, data)

    async def find(self, app_identifier: str) -> App | None:
        key = self._r.prefix + "ai:" + app_identifier
        owner: bytes | None = await self._r.run(lambda: self._r.client.get(key), idempotent=True)
        return await self.get(_text(owner)) if owner is not None else None

    async def list(
        self,
        provider: str | None = None,
        name: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[App]:
        check_page(offset, limit)
        client, prefix = self._r.client, self._r.prefix

        async def read() -> list[App]:
            ids = [_text(i) for i in await client.zrange(prefix + "as", 0, -1)]
            async with client.pipeline(transaction=False) as pipe:
                for aid in ids:
                    pipe.hmget(prefix + "a:" + aid, ["name", "provider", "data"])
                rows = await pipe.execute()
            return [_app(aid, *row) for aid, row in zip(ids, rows, strict=True) if row[0]]

        apps = await self._r.run(read, idempotent=True)
        items = [
            a
            for a in apps
            if (provider is None or a.provider == provider) and (name is None or a.name == name)
        ]
        return Page(items[offset : offset + limit], len(items), offset, limit)

    async def update(self, app: App) -> App:
        check_app(app)
        current = await self.get(app.id)
        if current is None:
            raise NotFound(f"app {app.id} not found")
        stored = App(
            name=app.name,
            provider=app.provider,
            app_ids=list(app.app_ids),
            credential_ids=list(app.credential_ids),
            id=app.id,
            created_at=current.created_at,
            updated_at=self._now(),
        )
        await self._save("update", stored)
        return stored

    async def delete(self, app_id: str) -> bool:
        return bool(await self._r.write(lua.DELETE_APP, [app_id]))


def _rejected(raw: bytes) -> RejectedToken:
    provider, digest, prefix, reason, at = json.loads(raw)
    return RejectedToken(provider, digest, prefix, reason, at)


class RedisRejectedTokens:
    """:class:`~sipwake.store.base.RejectedTokenStore` on Redis (hashes, never tokens)."""

    def __init__(self, r: _Redis) -> None:
        self._r = r

    async def add(self, provider: str, token: str, reason: str, at: float) -> RejectedToken:
        record = RejectedToken(
            provider, token_hash(provider, token), token_prefix(token), reason, at
        )
        member = f"{provider}\n{record.token_hash}"
        data = _dumps([provider, record.token_hash, record.token_prefix, reason, at])
        client, prefix = self._r.client, self._r.prefix

        async def write() -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(prefix + "r", member, data)
                pipe.zadd(prefix + "ra", {member: at})
                await pipe.execute()

        await self._r.run(write, idempotent=True)  # the same record written twice is one
        return record

    async def get(self, provider: str, token: str) -> RejectedToken | None:
        member = f"{provider}\n{token_hash(provider, token)}"
        key = self._r.prefix + "r"
        raw: bytes | None = await self._r.run(
            lambda: self._r.client.hget(key, member),
            idempotent=True,
        )
        return _rejected(raw) if raw is not None else None

    async def remove(self, provider: str, token: str) -> bool:
        member = f"{provider}\n{token_hash(provider, token)}"
        client, prefix = self._r.client, self._r.prefix

        async def write() -> bool:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hdel(prefix + "r", member)
                pipe.zrem(prefix + "ra", member)
                removed, _ = await pipe.execute()
            return bool(removed)

        return await self._r.run(write)

    async def purge(self, before: float) -> int:
        result: int = await self._r.write(lua.PURGE_REJECTED, [repr(float(before))])
        return result

    async def list(self, offset: int = 0, limit: int = 50) -> Page[RejectedToken]:
        check_page(offset, limit)
        client, prefix = self._r.client, self._r.prefix

        async def read() -> Page[RejectedToken]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zcard(prefix + "ra")
                pipe.zrevrange(prefix + "ra", offset, offset + limit - 1)
                total, members = await pipe.execute()
            if not members:
                return Page([], total, offset, limit)
            raws = await client.hmget(prefix + "r", members)
            items = [_rejected(r) for r in raws if r is not None]
            return Page(items, total, offset, limit)

        return await self._r.run(read, idempotent=True)


class RedisStore:
    """The Redis :class:`~sipwake.store.base.Store`: open with :meth:`open`, then close()."""

    def __init__(
        self, r: _Redis, box: SecretBox, now: Callable[[], float], node: str | None = None
    ) -> None:
        self._r = r
        #: This process's id in published events: a node ignores its own registrations.
        self.node = node or uuid.uuid4().hex
        self._bindings = RedisBindings(r, self.node)
        self._messages = RedisMessages(r)
        self._credentials = RedisCredentials(r, box, now)
        self._apps = RedisApps(r, now)
        self._rejected = RedisRejectedTokens(r)
        self._listeners: list[BindingListener] = []
        #: Other sipwake nodes use the same data: held messages may come from any of them.
        self.shared = True
        self._watch: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, data_dir: Path, now: Callable[[], float] = time.time
    ) -> RedisStore:
        """Connect to the Redis named by ``url``; secrets use the key in ``data_dir``.

        Every node of a cluster needs the same ``secret.key`` in its data dir, since a
        credential sealed by one node is opened by another.
        """
        try:
            target = parse_redis_url(url)
        except ValueError as exc:
            raise StoreError(f"{exc}") from None
        box = SecretBox.from_data_dir(data_dir)
        client = _connect(target)
        r = _Redis(client, target.prefix)
        try:
            await r.run(lambda: client.ping(), idempotent=True)
        except StoreError:
            await client.aclose()
            raise
        return cls(r, box, now)

    @property
    def bindings(self) -> RedisBindings:
        return self._bindings

    @property
    def messages(self) -> RedisMessages:
        return self._messages

    @property
    def credentials(self) -> RedisCredentials:
        return self._credentials

    @property
    def apps(self) -> RedisApps:
        return self._apps

    @property
    def rejected_tokens(self) -> RedisRejectedTokens:
        return self._rejected

    @property
    def prefix(self) -> str:
        return self._r.prefix

    @property
    def batches(self) -> int:
        """Write pipelines sent so far (concurrent writes share one)."""
        return self._r.batches

    def watch_bindings(self, listener: BindingListener) -> None:
        """Call ``listener(kind, binding)`` for each registration made through another node.

        ``kind`` is ``added`` or ``refreshed``. The subscription runs in the background
        and re-subscribes by itself after Redis comes back; registrations published while
        it was cut off are not replayed (a node holding a call re-reads the bindings when
        its own timers fire).
        """
        self._listeners.append(listener)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def wait_watching(self) -> None:
        """Return once the subscription is active (tests and start-up use it)."""
        await self._subscribed.wait()

    async def _watch_loop(self) -> None:
        channel = self._r.prefix + "events"
        delay = 0.1
        while not self._closed:
            pubsub = self._r.client.pubsub()
            try:
                await pubsub.subscribe(channel)
                while not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                        delay = 0.1
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except (rexc.RedisError, OSError) as exc:
                self._subscribed.clear()
                await self._r.lost()
                log.warning("binding events: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)  # reconnection back-off, not synchronisation
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(rexc.RedisError, OSError):
                    await pubsub.aclose()

    def _dispatch(self, data: bytes) -> None:
        try:
            node, kind, value = data.split(b"\n", 2)
            if node.decode() == self.node:
                return
            binding = _binding(value)
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            log.warning("binding events: unreadable event ignored (%s)", exc)
            return
        for listener in self._listeners:
            try:
                listener(kind.decode(), binding)
            except Exception:  # one listener's bug must not stop the subscription
                log.exception("binding event listener failed")

    async def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._r.aclose()

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
