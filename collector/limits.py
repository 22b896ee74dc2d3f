"""Per-probe request rate limit: a token bucket per probe (OWASP API4; reliability.md C3).

Pure apart from the clock, which is injected: ``take`` answers "allowed" or the seconds to
wait, which the API sends as Retry-After with a 429.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

SWEEP_MIN = 1024


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``per_min`` requests a minute per key on average, bursts of up to ``burst``."""

    def __init__(self, per_min: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_min / 60.0
        self.burst = max(1, burst)
        self.clock = clock
        self.buckets: dict[str, _Bucket] = {}
        self.sweep_at = SWEEP_MIN

    def take(self, key: str) -> float | None:
        """None if a request is allowed now; else the seconds until one will be."""
        now = self.clock()
        if len(self.buckets) >= self.sweep_at:
            self._sweep(now)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / self.rate

    def _sweep(self, now: float) -> None:
        """Forget every bucket that has refilled: it is the same as a new one. Keys come
        from anyone's address (unswept, the buckets grew with every new address), so
        memory stays proportional to the clients of the last burst/rate seconds. The next
        sweep comes when the table has doubled, so sweeping costs O(1) per request."""
        full = self.burst / self.rate if self.rate > 0 else math.inf
        self.buckets = {k: b for k, b in self.buckets.items() if now - b.updated < full}
        self.sweep_at = max(SWEEP_MIN, 2 * len(self.buckets))

    @staticmethod
    def retry_after(wait_s: float) -> str:
        return str(max(1, math.ceil(wait_s)))
