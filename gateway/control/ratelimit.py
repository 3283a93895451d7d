"""Token-bucket rate limiting keyed by client, with a bounded table.

Used where the public (or an attacker guessing admin tokens) can reach us. The table is an
LRU of at most ``max_keys`` buckets, so a flood of distinct source addresses costs bounded
memory; the clock is injected so tests need no sleeping. Only :meth:`RateLimiter.hit`
creates a bucket: asking :meth:`RateLimiter.allowed` for a key never seen answers from a
full budget without inserting one, so a flood of requests that fail nothing (or that come
from many addresses) cannot evict the bucket of a client that exhausted its budget. A caller
that must also bound failures spread over many keys keeps a second limiter with one key
(the admin API does: see :mod:`gateway.control.auth`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """``rate`` events per ``per`` seconds per key, bursting up to ``burst``."""

    def __init__(
        self,
        rate: float,
        per: float = 60.0,
        *,
        burst: float | None = None,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or per <= 0:
            raise ValueError("rate and per must be positive")
        self._refill = rate / per
        self._burst = burst if burst is not None else rate
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._refill)
            bucket.stamp = now
        return bucket

    def allowed(self, key: str) -> bool:
        """True if ``key`` has budget left now (does not consume it, nor add a bucket)."""
        if key not in self._buckets:
            return self._burst >= 1.0
        return self._bucket(key).tokens >= 1.0

    def hit(self, key: str) -> bool:
        """Consume one unit for ``key``; False when the budget is exhausted."""
        bucket = self._bucket(key)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` has one unit again (0 if it has one now)."""
        if key not in self._buckets:
            return 0.0
        bucket = self._bucket(key)
        return max(0.0, (1.0 - bucket.tokens) / self._refill)
