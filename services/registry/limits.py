"""A heartbeat budget per cell, spent before any Redis work: one cell sending far past its
heartbeat rate costs the registry a parse and an ack per message, not a Redis round trip, so the
queue it shares with every other cell keeps moving (RELIABILITY 16)."""

from __future__ import annotations

from dataclasses import dataclass

# Past this many tracked cells, the buckets that have filled up again are forgotten (a full
# bucket and a missing one mean the same).
_PRUNE_AT = 50_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class PerCellLimit:
    """A token bucket per cell: ``rate`` heartbeats a second on average, ``burst`` at once.
    A rate of 0 turns the limit off. Each registry replica keeps its own buckets."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, max(burst, 1.0)
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, cell: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(cell)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[cell] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {c: b for c, b in self._buckets.items() if now - b.at < refill}
