"""A budget per cell for every kind of message it sends, spent before any Redis work or reply:
one cell sending far past what an agent sends costs a service a parse and an ack per message,
not a Redis round trip or a command to its queue, so the queues it shares with every other
cell keep moving (RELIABILITY 16).

Heartbeats have the registry's own budget (``SUBSTRATE_HEARTBEAT_LIMIT_PER_SECOND``); every
other report is budgeted by ``limit_cell_reports`` wherever a service consumes it, with the
defaults below (``SUBSTRATE_CELL_BUDGETS`` overrides them). An agent never comes near them: it
registers on start and reconnect, syncs once a minute and on reconnect, and reports a few
phases per upgrade. A message over budget is acknowledged, not applied, and counted in
``substrate_cell_messages_limited_total{kind}``: what it asked is asked again by the agent's
next message of its kind (a sync, a registration), and an agent's reports never exceed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from prometheus_client import Counter

from common.bus.errors import refuse_foreign_sender
from common.messages import CellReport, Delivery
from common.routes import Route

# Past this many tracked cells, the buckets that have filled up again are forgotten (a full
# bucket and a missing one mean the same).
_PRUNE_AT = 50_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class PerCellLimit:
    """A token bucket per cell: ``rate`` messages a second on average, ``burst`` at once.
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


# (rate a second, burst) per kind of report.
DEFAULT_BUDGETS: Mapping[str, tuple[float, float]] = {
    "register": (0.1, 10),
    "sync": (1.0, 20),
    "upgrade": (5.0, 100),
    "maintenance": (1.0, 20),
    "debug-access": (1.0, 20),
}


@cache
def _limited() -> Counter:
    return Counter(
        "substrate_cell_messages_limited",
        "Cell messages over their cell's budget, acknowledged and not applied, by kind",
        ["kind"],
    )


def limit_cell_reports(
    routes: Sequence[Route],
    budgets: Mapping[str, tuple[float, float]] | None = None,
    now: Callable[[], float] = time.monotonic,
) -> list[Route]:
    """``routes`` with each cell report's handler behind a budget per cell and kind. A report
    that speaks for another cell is refused first (dead-lettered, never silently dropped);
    the budget is the broker-authenticated sender's (``user_id``)."""
    kinds = {**DEFAULT_BUDGETS, **(budgets or {})}
    limited: list[Route] = []
    for r in routes:
        kind = r.model.kind if issubclass(r.model, CellReport) else None
        rate, burst = kinds.get(kind, (0.0, 1.0)) if kind else (0.0, 1.0)
        if kind is None or rate <= 0:
            # Not a cell's report, or no budget (heartbeats have the registry's own): as it is.
            limited.append(r)
            continue
        limited.append(Route(r.model, _budgeted(r.handler, PerCellLimit(rate, burst), kind, now)))
    return limited


def _budgeted(
    handler: Callable[[Any, Delivery], Any],
    limit: PerCellLimit,
    kind: str,
    now: Callable[[], float],
) -> Callable[[Any, Delivery], Any]:
    counter = _limited().labels(kind)

    async def within_budget(msg: Any, delivery: Delivery) -> Any:
        # One that speaks for another cell is refused visibly, over budget or not.
        refuse_foreign_sender(msg, delivery)
        if not limit.allow(delivery.user_id or delivery.routing_key, now()):
            counter.inc()
            return None
        return await handler(msg, delivery)

    return within_budget
