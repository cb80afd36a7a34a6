"""Listing the fleet page by page, with the next page read ahead.

``cells list --all`` asks for each page once it has the previous one (it needs its last id),
so the registry sat idle while the operator's side took a page in, and the operator's side
while the registry read the next: at 100,000 cells a page cost its two halves one after the
other. A full page of the largest size (only ``--all`` asks for those) now starts the read of
the next one as soon as it is answered; the request that follows finds it ready, or waits for
it. A page read ahead is at most ``FRESH_SECONDS`` old when it is answered, and is answered
only to the request it was read for (same filters, after the same id); replicas that answer
the next request instead read it themselves.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress

from common.requests.registry import MAX_PAGE, CellsList
from services.registry.store import RegistryStore

FRESH_SECONDS = 5.0
# Listings read ahead at once (each holds one page of records until asked for or expired).
KEPT = 8

Records = list[dict[str, str]]


async def read_page(store: RegistryStore, req: CellsList) -> Records:
    """The records of the page ``req`` asks for, read now."""
    return await store.find(
        req.matches(),
        after=req.after,
        limit=req.limit,
        decommissioned=req.decommissioned or req.status == "decommissioned",
    )


class Pages:
    def __init__(self, store: RegistryStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        # (the request as asked) -> (when read, the read)
        self._ahead: OrderedDict[str, tuple[float, asyncio.Task[Records]]] = OrderedDict()

    async def page(self, req: CellsList) -> Records:
        """The records of the page ``req`` asks for."""
        key = req.model_dump_json()
        ahead = self._ahead.pop(key, None)
        records = None
        if ahead is not None and self.clock() - ahead[0] <= FRESH_SECONDS:
            with suppress(Exception):  # a failed read ahead is read again, here
                records = await ahead[1]
        if records is None:
            records = await read_page(self.store, req)
        if req.limit == MAX_PAGE and len(records) == MAX_PAGE:
            self._read_ahead(req.model_copy(update={"after": records[-1]["id"]}))
        return records

    def _read_ahead(self, req: CellsList) -> None:
        task = asyncio.get_running_loop().create_task(read_page(self.store, req))
        # A read nobody asks for is dropped with its entry; its error, if any, is nobody's.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._ahead[req.model_dump_json()] = (self.clock(), task)
        while len(self._ahead) > KEPT:
            _, (_, dropped) = self._ahead.popitem(last=False)
            dropped.cancel()
