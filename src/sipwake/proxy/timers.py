"""A timer queue on a :class:`~sipwake.clock.Clock`, for the router's call and push timers.

Sans-IO: :meth:`TimerQueue.tick` fires what is due at ``clock.monotonic()``; tests call it
after moving a FakeClock. :class:`LoopTimers` adds the asyncio edge: one loop timer kept
at the earliest deadline, like the SIP endpoint does for transactions.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from sipwake.clock import Clock

#: Seconds of slack added to the loop timer: router timers need no finer resolution.
RESOLUTION = 0.001


class Timer:
    """One scheduled callback; :meth:`cancel` makes it never fire."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerQueue:
    """Callbacks at absolute deadlines on a clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(deadline, callback)
        heapq.heappush(self._heap, (deadline, next(self._seq), timer))
        self._changed()
        return timer

    def after(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.at(self.clock.monotonic() + delay, callback)

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def tick(self) -> int:
        """Run every callback due now; returns how many ran."""
        now = self.clock.monotonic()
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            _, _, timer = heapq.heappop(heap)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()
                ran += 1
        self._changed()
        return ran

    def __len__(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)

    def _changed(self) -> None:
        """Hook for :class:`LoopTimers`."""


class LoopTimers(TimerQueue):
    """A :class:`TimerQueue` that fires itself from the running asyncio loop."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    def _changed(self) -> None:
        deadline = self.next_deadline()
        if deadline is None:
            return
        if self._armed_at is not None and self._armed_at <= deadline:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand (tests call tick())
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = deadline
        delay = max(deadline - self.clock.monotonic(), 0.0) + RESOLUTION
        self._handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = None
        self.tick()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._heap.clear()
