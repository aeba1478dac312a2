"""MESSAGEs held for sleeping devices: stored before 202, delivered in order, deleted once.

The router answers 202 only after :meth:`HeldMessages.hold` returns, that is once the
store has the MESSAGE on disk, so a restart in between loses nothing. When a device of
the AOR registers, :meth:`HeldMessages.deliver` sends the held MESSAGEs one after the
other in arrival order, each waiting for the device's final answer; a 2xx deletes it. A
device that does not answer keeps the rest for its next registration. Held MESSAGEs
past ``message-delivery-timeout`` are dropped by :meth:`HeldMessages.expire_due`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sipwake.clock import Clock
from sipwake.config import Config
from sipwake.sip.message import Request, SipParseError, parse_message
from sipwake.store.base import Store
from sipwake.store.model import HeldMessage

log = logging.getLogger("sipwake.router")

#: Final answers after which the device may take the MESSAGE later: keep it.
RETRY_LATER = frozenset({408, 480, 503})

Send = Callable[[Request], Awaitable[int]]


class HeldMessages:
    """The durable "push bucket" of MESSAGEs, per AOR."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
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

    async def hold(self, aor: str, request: Request) -> str:
        """Store ``request`` for ``aor``; returns once it is durable."""
        now = self.clock.wall()
        timeout = self.config.router.message_delivery_timeout
        message = HeldMessage(aor, request.to_bytes(), received_at=now, expires_at=now + timeout)
        message_id = await self.store.messages.add(message)
        self._aors.add(aor)
        return message_id

    async def delete(self, message_id: str) -> bool:
        return await self.store.messages.delete(message_id)

    async def deliver(self, aor: str, send: Send) -> int:
        """Send the held MESSAGEs of ``aor`` in order through ``send``; returns how many
        were delivered. One delivery per AOR runs at a time, so order holds."""
        lock = self._locks.setdefault(aor, asyncio.Lock())
        delivered = 0
        async with lock:
            # MESSAGEs held while this runs queue behind the others: read until none is left.
            while pending := await self.store.messages.pending(aor, now=self.clock.wall()):
                for message in pending:
                    status = await self._send_one(message, send)
                    if status in RETRY_LATER:
                        return delivered  # the rest waits for the next registration
                    if await self.store.messages.delete(message.id) and status < 300:
                        delivered += 1
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
        for message in expired:
            log.info("a MESSAGE held for %s expired undelivered", message.aor)
        return expired

    async def _expiry_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.expire_due()
            except Exception as exc:  # the loop must outlive a bad moment of the store
                log.warning("held MESSAGE expiry failed: %s", exc)


__all__ = ["HeldMessages"]
