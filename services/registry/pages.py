"""Listing the fleet page by page, with the next page made ahead.

``cells list --all`` asks for each page once it has the previous one (it needs its last id),
so the registry sat idle while the operator's side took a page in, and the operator's side
while the registry made the next: at 100,000 cells a page cost its two halves one after the
other. A full page of the largest size (only ``--all`` asks for those) now starts making the
next one as soon as it is answered: its records read and checked into the answer, so the
request that follows finds it ready to send, or waits for it. A page made ahead is at most
``FRESH_SECONDS`` old when it is answered, and is answered only to the request it was made
for (same filters, after the same id); replicas that answer the next request instead make it
themselves.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

from common.requests.registry import MAX_PAGE, CellsList, ListedCell
from common.vocabulary import REGISTERED
from services.registry.store import RegistryStore, views_as

FRESH_SECONDS = 5.0
# Listings made ahead at once (each holds one page until asked for or expired).
KEPT = 8

Listing = Callable[[CellsList], Coroutine[Any, Any, list[ListedCell]]]


def flags_behind(status: str | None, held: int | None, current: int) -> bool:
    """Whether a registered cell's flags snapshot is older than the current one."""
    return status in REGISTERED and current > 0 and (held or 0) < current


async def listing(store: RegistryStore, req: CellsList) -> list[ListedCell]:
    """The page ``req`` asks for, read now."""
    records = await store.find(
        req.matches(),
        after=req.after,
        limit=req.limit,
        decommissioned=req.decommissioned or req.status == "decommissioned",
    )
    current = await store.flags_version()
    behind = [
        {"flags_behind": flags_behind(raw.get("status"),
                                      int(raw.get("flags_snapshot_version") or 0), current)}
        for raw in records
    ]  # fmt: skip
    return views_as(ListedCell, records, behind)


class Pages:
    def __init__(self, make: Listing, clock: Callable[[], float]) -> None:
        self.make = make
        self.clock = clock
        # (the request as asked) -> (when started, the page)
        self._ahead: OrderedDict[str, tuple[float, asyncio.Task[list[ListedCell]]]] = OrderedDict()

    async def page(self, req: CellsList) -> list[ListedCell]:
        """The page ``req`` asks for."""
        key = req.model_dump_json()
        ahead = self._ahead.pop(key, None)
        cells = None
        if ahead is not None and self.clock() - ahead[0] <= FRESH_SECONDS:
            with suppress(Exception):  # a page that failed ahead is made again, here
                cells = await ahead[1]
        if cells is None:
            cells = await self.make(req)
        if req.limit == MAX_PAGE and len(cells) == MAX_PAGE:
            self._make_ahead(req.model_copy(update={"after": cells[-1].id}))
        return cells

    def _make_ahead(self, req: CellsList) -> None:
        task = asyncio.get_running_loop().create_task(self.make(req))
        # A page nobody asks for is dropped with its entry; its error, if any, is nobody's.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._ahead[req.model_dump_json()] = (self.clock(), task)
        while len(self._ahead) > KEPT:
            _, (_, dropped) = self._ahead.popitem(last=False)
            dropped.cancel()
