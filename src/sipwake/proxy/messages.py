"""MESSAGEs held for sleeping devices: stored before 202, delivered to every device once.

The router answers 202 only after :meth:`HeldMessages.hold` returns, that is once the
store has the MESSAGE on disk, so a restart in between loses nothing.

Delivery is per device (fork-late, as Flexisip forks a MESSAGE to each device that
registers while the fork lives). A device is a binding's ``+sip.instance``, else its push
token (the store replaces a binding whose token registers from another contact: the same
phone), else its Contact (:func:`device_of`). The rules:

- A held MESSAGE is owed to every device of the AOR that was registered when it arrived
  (push-enabled or not) and had not answered it yet. It is *done*, and deleted, once each
  of those devices got it (a final answer other than 408/480/503) or when it expires
  (``message-delivery-timeout``).
- Until then, a device registering for the first time (a new device of the AOR, say a
  tablet added after the message arrived) gets it too: the message's lifetime is the
  fork's, as in Flexisip.
- When a device registers, :meth:`HeldMessages.deliver` sends it, one after the other in
  arrival order and each waiting for the device's final answer, the held MESSAGEs it has
  not received; a device that does not answer (408/480/503) keeps the rest for its next
  registration. Each device gets each MESSAGE once, in order, across restarts.

What is durable: the MESSAGE row's ``target`` lists the devices owed it (``fork-late``
and a JSON list; ``None`` for a MESSAGE held before per-device delivery, owed to the first
device that takes it), and each delivery to a device that leaves others owed adds a
marker row (request ``delivered``, ``target`` ``got`` and JSON ``[message id, device]``) with the
MESSAGE's expiry, so both backends keep it without a schema change and expire it with the
MESSAGE. Held MESSAGEs past ``message-delivery-timeout`` are dropped by
:meth:`HeldMessages.expire_due`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable

from sipwake.clock import Clock
from sipwake.config import Config
from sipwake.sip.message import Request, SipParseError, parse_message
from sipwake.store.base import Store
from sipwake.store.model import Binding, HeldMessage

log = logging.getLogger("sipwake.router")

#: Final answers after which the device may take the MESSAGE later: keep it.
RETRY_LATER = frozenset({408, 480, 503})

Send = Callable[[Request], Awaitable[int]]

#: ``target`` of a held MESSAGE owed to the devices listed after it (a JSON list).
OWED = "fork-late "
#: ``target`` of a marker row: the device after it (JSON ``[message id, device]``) got it.
GOT = "got "
#: The request bytes of a marker row (the stores keep no empty request).
MARKER_REQUEST = b"delivered"


def device_of(binding: Binding) -> str:
    """The device a binding belongs to, for per-device delivery: its ``+sip.instance``,
    else its push token (as a hash: tokens are secrets), else its Contact."""
    if binding.instance_id:
        return binding.instance_id
    if binding.push_key:
        return "pn:" + hashlib.sha256(binding.push_key.encode()).hexdigest()[:24]
    return binding.key


def _owed(message: HeldMessage) -> frozenset[str] | None:
    """The devices a held MESSAGE is owed to; None: the first device that takes it."""
    if message.target is None or not message.target.startswith(OWED):
        return None
    try:
        devices = json.loads(message.target[len(OWED) :])
    except ValueError:
        return None
    return frozenset(str(d) for d in devices) if isinstance(devices, list) else None


def _marker(message: HeldMessage) -> tuple[str, str] | None:
    """(message id, device) of a marker row; None for a MESSAGE."""
    if message.target is None or not message.target.startswith(GOT):
        return None
    try:
        value = json.loads(message.target[len(GOT) :])
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 2:
        return str(value[0]), str(value[1])
    return None


class _Held:
    """The rows of one AOR read back: MESSAGEs in order, and who got each."""

    def __init__(self, rows: list[HeldMessage]) -> None:
        self.messages: list[HeldMessage] = []
        self.got: dict[str, set[str]] = {}
        self.markers: dict[str, list[str]] = {}
        for row in rows:
            marker = _marker(row)
            if marker is None:
                self.messages.append(row)
                continue
            message_id, device = marker
            self.got.setdefault(message_id, set()).add(device)
            self.markers.setdefault(message_id, []).append(row.id)


class HeldMessages:
    """The durable "push bucket" of MESSAGEs, per AOR."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        #: Per AOR: who got a MESSAGE is read and written by one delivery at a time.
        self._commits: dict[str, asyncio.Lock] = {}
        self._aors: set[str] = set()
        # After a restart the store may hold messages for any AOR until proven empty.
        self._unknown = True
        self._loop: asyncio.Task[None] | None = None
        #: Other nodes hold MESSAGEs in a shared store: any AOR may have some.
        self._shared = bool(getattr(store, "shared", False))

    async def start(self, expire_every: float = 5.0) -> None:
        """Learn whether anything is held (from before a restart); expire in the background."""
        self._unknown = await self.store.messages.count() > 0
        self._loop = asyncio.get_running_loop().create_task(self._expiry_loop(expire_every))

    async def aclose(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    def holding(self, aor: str) -> bool:
        """True when MESSAGEs for ``aor`` are known to wait: a new one queues behind them."""
        return aor in self._aors

    def may_have(self, aor: str) -> bool:
        """Cheap check on each registration: could ``aor`` have held MESSAGEs?

        Always true with a shared store (Redis): another node may have held some since.
        """
        return self._shared or self._unknown or aor in self._aors

    async def hold(
        self,
        aor: str,
        request: Request,
        devices: Iterable[str] = (),
        delivered: Iterable[str] = (),
    ) -> str:
        """Store ``request`` for ``aor``, owed to ``devices`` (those registered at its
        arrival that have not answered); ``delivered`` devices already got it. Returns
        once it is durable."""
        now = self.clock.wall()
        timeout = self.config.router.message_delivery_timeout
        owed = sorted(set(devices))
        target = OWED + json.dumps(owed) if owed else None
        message = HeldMessage(
            aor, request.to_bytes(), received_at=now, expires_at=now + timeout, target=target
        )
        message.id = await self.store.messages.add(message)
        self._aors.add(aor)
        for device in set(delivered):
            await self._add_marker(message, device)
        return message.id

    async def delete(self, message_id: str) -> bool:
        return await self.store.messages.delete(message_id)

    async def delivered_to(self, aor: str, message_id: str, device: str) -> None:
        """``device`` took the held MESSAGE ``message_id``: done when none is owed it."""
        commit = self._commits.setdefault(aor, asyncio.Lock())
        async with commit:
            held = _Held(await self.store.messages.pending(aor, now=self.clock.wall()))
            for message in held.messages:
                if message.id == message_id:
                    await self._done_for(message, device, held)
                    return

    async def _done_for(self, message: HeldMessage, device: str, held: _Held) -> None:
        got = held.got.get(message.id, set()) | {device}
        owed = _owed(message)
        if owed is None or owed <= got:
            # Every device owed it got it: the MESSAGE and its markers go.
            await self.store.messages.delete(message.id)
            for marker_id in held.markers.get(message.id, []):
                await self.store.messages.delete(marker_id)
            return
        await self._add_marker(message, device)

    async def _add_marker(self, message: HeldMessage, device: str) -> None:
        marker = HeldMessage(
            message.aor,
            MARKER_REQUEST,
            received_at=message.received_at,
            expires_at=message.expires_at,
            target=GOT + json.dumps([message.id, device]),
        )
        await self.store.messages.add(marker)

    async def deliver(self, aor: str, device: str, send: Send) -> int:
        """Send ``device`` the held MESSAGEs of ``aor`` it has not received, in order,
        through ``send``; returns how many were delivered. One delivery per device runs
        at a time, so order holds."""
        lock = self._locks.setdefault((aor, device), asyncio.Lock())
        commit = self._commits.setdefault(aor, asyncio.Lock())
        delivered = 0
        async with lock:
            # MESSAGEs held while this runs queue behind the others: read until none is left.
            while True:
                held = _Held(await self.store.messages.pending(aor, now=self.clock.wall()))
                todo = [m for m in held.messages if device not in held.got.get(m.id, ())]
                if not todo:
                    break
                for message in todo:
                    status = await self._send_one(message, send)
                    if status in RETRY_LATER:
                        return delivered  # the rest waits for the next registration
                    async with commit:
                        now = self.clock.wall()
                        latest = _Held(await self.store.messages.pending(aor, now=now))
                        if any(m.id == message.id for m in latest.messages):
                            await self._done_for(message, device, latest)
                            if status < 300:
                                delivered += 1
            if not held.messages:
                self._aors.discard(aor)
            if self._unknown and await self.store.messages.count() == 0:
                self._unknown = False
        return delivered

    async def _send_one(self, message: HeldMessage, send: Send) -> int:
        try:
            request = parse_message(message.request)
        except SipParseError:
            log.error("a held MESSAGE for %s cannot be read back; dropped", message.aor)
            return 400
        if not isinstance(request, Request):
            return 400
        status = await send(request)
        if status >= 300 and status not in RETRY_LATER:
            log.warning("a held MESSAGE for %s was refused with %d; dropped", message.aor, status)
        return status

    async def expire_due(self) -> list[HeldMessage]:
        """Drop held MESSAGEs past message-delivery-timeout."""
        expired = await self.store.messages.expire(self.clock.wall())
        messages = [m for m in expired if _marker(m) is None]
        for message in messages:
            log.info("a MESSAGE held for %s expired undelivered", message.aor)
        return messages

    async def _expiry_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.expire_due()
            except Exception as exc:  # the loop must outlive a bad moment of the store
                log.warning("held MESSAGE expiry failed: %s", exc)


__all__ = ["HeldMessages", "device_of"]
