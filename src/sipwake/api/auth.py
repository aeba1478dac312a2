"""API keys and per-key rate limits for /v1/* (and /pnm2/* when asked).

Keys are compared in constant time against every configured key, so response time tells
nothing about how much of a guess was right. The rate limit is a token bucket per key (per
client address when no keys are configured), driven by the context's clock.
"""

from __future__ import annotations

import hmac
import math
from collections import OrderedDict
from dataclasses import dataclass

from sipwake.api.app import ApiContext, error_for
from sipwake.api.httpd import Request, Response
from sipwake.clock import Clock

#: Most buckets kept; past it the least recently used one is forgotten. A bucket refilled
#: to ``burst`` is dropped as soon as it is the least recently used (it says nothing a new
#: bucket would not), so only clients seen within the refill time compete for the room.
MAX_BUCKETS = 10000


def check_key(presented: str, keys: list[str]) -> str | None:
    """The configured key equal to ``presented`` (constant time over all keys), or None."""
    given = presented.encode()
    found: str | None = None
    for key in keys:
        if hmac.compare_digest(given, key.encode()):
            found = key
    return found


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets: ``rate`` requests per second, ``burst`` at most at once."""

    def __init__(
        self, rate: float, burst: float, clock: Clock, *, capacity: int = MAX_BUCKETS
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.capacity = max(1, capacity)
        # Least recently used first: a bucket moves to the end at each request.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.limited = 0  # requests refused, for /metrics

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, who: str) -> float:
        """0 when the request may go, else the seconds until one would be allowed.

        O(1) per request (amortized): at most one bucket is created and each bucket is
        forgotten once.
        """
        now = self.clock.monotonic()
        buckets = self._buckets
        bucket = buckets.get(who)
        if bucket is None:
            self._forget_full(now)
            if len(buckets) >= self.capacity:
                buckets.popitem(last=False)  # the least recently used client
            bucket = buckets[who] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(who)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        self.limited += 1
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop least recently used buckets that have refilled to ``burst`` (at most two,
        so a request never pays for many; every bucket is dropped at most once)."""
        buckets = self._buckets
        for _ in range(2):
            if not buckets:
                return
            oldest = next(iter(buckets.values()))
            if oldest.tokens + (now - oldest.at) * self.rate < self.burst:
                return
            buckets.popitem(last=False)


def _guarded(path: str, ctx: ApiContext) -> tuple[bool, bool]:
    """(needs a key, is rate limited) for a request path."""
    if path.startswith("/v1/"):
        return bool(ctx.http.api_keys), True
    if path == "/pnm2" or path.startswith("/pnm2/"):
        return bool(ctx.http.api_keys) and ctx.http.pnm2_auth, True
    return False, False


class Guard:
    """Checks keys and rate limits before any handler runs."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        http = ctx.http
        self.limiter = (
            RateLimiter(http.rate_limit, http.rate_limit_burst or http.rate_limit, ctx.clock)
            if http.rate_limit > 0
            else None
        )
        ctx.limiter = self.limiter

    def check(self, request: Request) -> Response | None:
        """None when the request may go on, else the 401 or 429 answer."""
        ctx = self.ctx
        needs_key, limited = _guarded(request.path, ctx)
        who = request.remote or "unknown"
        if needs_key:
            header: str = request.headers.get("authorization", "")
            scheme, _, presented = header.partition(" ")
            key = None
            if scheme.lower() == "bearer":
                key = check_key(presented.strip(), ctx.http.api_keys)
            if key is None:
                detail = (
                    "missing Authorization: Bearer <api key>"
                    if not header
                    else "invalid API key (expected Authorization: Bearer <api key>)"
                )
                return error_for(
                    request.path, 401, "Unauthorized", detail, {"WWW-Authenticate": "Bearer"}
                )
            who = "key:" + key
        if limited and self.limiter is not None:
            wait = self.limiter.take(who)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return error_for(
                    request.path,
                    429,
                    "Too Many Requests",
                    f"rate limit of {ctx.http.rate_limit} requests/s exceeded; retry in {retry} s",
                    {"Retry-After": str(retry)},
                )
        return None
