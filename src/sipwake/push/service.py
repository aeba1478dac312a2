"""The push service: one engine for the SIP side, the HTTP API and the CLI.

It picks the provider for each destination, queues what exceeds each provider's
concurrency (``max_concurrent`` pushes under way per provider instance, then up to
``[push] max-queue-size`` waiting, first come first served), reports dead tokens to whoever
stores them, and keeps the counters and latency histogram that ``/metrics`` exposes.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sipwake.clock import Clock, SystemClock
from sipwake.push.providers.base import PushProvider
from sipwake.push.request import Destination, Outcome, PushRequest, PushResult

log = logging.getLogger("sipwake.push")

# Upper bounds (seconds) of the provider-latency histogram buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

TokenRejectedCallback = Callable[[Destination, PushResult], None]
#: Finds the provider of a destination before the static list is tried (the app registry).
ProviderLookup = Callable[[Destination], PushProvider | None]


@dataclass
class Histogram:
    """A Prometheus-style cumulative histogram."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        # The first bucket whose bound is >= value; past the last bound: the +Inf bucket.
        self.counts[bisect_left(self.buckets, value) if value == value else -1] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", self.count))
        return out


@dataclass
class PushStats:
    """What /metrics reports about pushes."""

    results: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    latency: dict[str, Histogram] = field(default_factory=dict)
    rejected_tokens: Counter[str] = field(default_factory=Counter)

    def record(self, provider: str, request: PushRequest, result: PushResult) -> None:
        outcome = result.outcome
        # ``_value_`` is what ``.value`` returns, without the descriptor's cost per push.
        self.results[(provider, request.kind._value_, outcome._value_)] += 1
        if outcome is Outcome.TOKEN_REJECTED:
            self.rejected_tokens[provider] += 1


#: Pushes under way at once per provider instance before further ones wait: the HTTP/2
#: client multiplexes them (APNs allows 1000 streams per connection).
DEFAULT_MAX_CONCURRENT = 1000
_MAX_LANES = 1024


class _Lane:
    """One provider instance's pushes: those under way and those waiting for a turn."""

    __slots__ = ("active", "name", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = 0
        self.waiting: deque[asyncio.Future[None]] = deque()


class PushService:
    """Routes provider-neutral pushes to the provider that can deliver them."""

    def __init__(
        self,
        providers: Sequence[PushProvider],
        *,
        max_queue_size: int = 100,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        clock: Clock | None = None,
        on_token_rejected: TokenRejectedCallback | None = None,
        lookup: ProviderLookup | None = None,
    ) -> None:
        self.providers = list(providers)
        self.lookup = lookup
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_queue_size = max_queue_size  # waiting per provider; 0: unbounded
        self.max_concurrent = max_concurrent
        self.clock = clock or SystemClock()
        self.stats = PushStats()
        self._lanes: dict[PushProvider, _Lane] = {}
        self._listeners: list[TokenRejectedCallback] = []
        if on_token_rejected is not None:
            self._listeners.append(on_token_rejected)

    def add_token_rejected_listener(self, callback: TokenRejectedCallback) -> None:
        """Be told of every token a provider declared dead (to drop bindings)."""
        self._listeners.append(callback)

    def provider_for(self, destination: Destination) -> PushProvider | None:
        """The provider of ``destination``: the lookup hook's, else the first that accepts it.

        The hook (apps with their own credentials) wins, so an app's pushes use its keys.
        Order then matters: an external pusher, when configured, is listed first and so
        takes precedence over the native providers, as in Flexisip.
        """
        if self.lookup is not None:
            found = self.lookup(destination)
            if found is not None:
                return found
        for provider in self.providers:
            if provider.accepts(destination):
                return provider
        return None

    def queue_depth(self) -> dict[str, int]:
        """Pushes accepted and not yet answered (waiting + under way), per provider name."""
        depth: Counter[str] = Counter()
        for lane in self._lanes.values():
            n = lane.active + len(lane.waiting)
            if n:
                depth[lane.name] += n
        return dict(depth)

    async def send(self, request: PushRequest) -> PushResult:
        """Send one push; every outcome, including refusal, comes back as a result."""
        dest = request.destination
        provider = self.provider_for(dest)
        if provider is None:
            result = PushResult(
                Outcome.FAILED, f"no configured provider for {dest.provider.value} {dest.app_id}"
            )
            self.stats.record(dest.provider.value, request, result)
            return result
        name = provider.name
        lane = self._lanes.get(provider)
        if lane is None:
            lane = self._new_lane(provider)
        if lane.active < self.max_concurrent and not lane.waiting:
            lane.active += 1  # the common case: a free slot, no wait
        else:
            if self.max_queue_size and len(lane.waiting) >= self.max_queue_size:
                result = PushResult(
                    Outcome.FAILED,
                    f"{name} queue full: {lane.active} pushes under way and "
                    f"{len(lane.waiting)} waiting (max-queue-size {self.max_queue_size})",
                )
                self.stats.record(name, request, result)
                log.warning("push to %s dropped: %s", dest.token_prefix(), result.reason)
                return result
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.waiting.append(turn)
            try:
                await turn  # resolved with the slot of a push that ended
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release(lane)  # the slot was handed over: pass it on
                else:
                    lane.waiting.remove(turn)
                raise
        clock = self.clock
        started = clock.monotonic()  # the provider's latency, not the wait for a turn
        try:
            result = await provider.send(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a provider bug must not lose the caller's answer
            log.exception("provider %s raised while sending to %s", name, dest.token_prefix())
            result = PushResult(Outcome.FAILED, f"internal error: {type(exc).__name__}")
        finally:
            self._release(lane)
        stats = self.stats
        histogram = stats.latency.get(name)
        if histogram is None:
            histogram = stats.latency[name] = Histogram()
        histogram.observe(clock.monotonic() - started)
        stats.record(name, request, result)
        outcome = result.outcome
        if outcome is Outcome.SENT:
            return result
        if outcome is Outcome.TOKEN_REJECTED:
            log.info("%s rejected token %s: %s", name, dest.token_prefix(), result.reason)
            for listener in self._listeners:
                listener(dest, result)
        elif outcome is Outcome.FAILED:
            log.warning("push to %s via %s failed: %s", dest.token_prefix(), name, result.reason)
        return result

    def _new_lane(self, provider: PushProvider) -> _Lane:
        lanes = self._lanes
        if len(lanes) >= _MAX_LANES:  # providers of apps come and go: forget idle ones
            for key in [k for k, v in lanes.items() if not v.active and not v.waiting]:
                del lanes[key]
        lane = lanes[provider] = _Lane(provider.name)
        return lane

    @staticmethod
    def _release(lane: _Lane) -> None:
        """A push of ``lane`` ended: its slot goes to the first waiting push, if any."""
        waiting = lane.waiting
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # ``active`` is unchanged: the slot changes hands
                return
        lane.active -= 1

    async def send_many(self, requests: Iterable[PushRequest]) -> list[PushResult]:
        """Send a batch concurrently; results come back in the order of ``requests``."""
        return list(await asyncio.gather(*(self.send(r) for r in requests)))

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()
