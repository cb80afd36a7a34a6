"""Maintenance windows: set, clear and list a cell's or an org's (common/windows.py); the
controller holds a release that needs a window until the cell's is open
(model/windows.py)."""

from __future__ import annotations

from datetime import datetime

from common.bus.errors import RpcFailure
from common.messages import Delivery
from common.requests.rollout import WindowsClear, WindowsEntry, WindowsList, WindowsSet
from common.routes import Route, route
from common.windows import WindowSet
from services.rollout.handlers import Deps, known_cell


def _windows_entry(owner: str, windows: WindowSet, now: datetime) -> WindowsEntry:
    return WindowsEntry(
        owner=owner,
        windows=windows,
        open_now=windows.is_open(now),
        next_open=windows.next_open(now).isoformat(),
    )


async def windows_set(req: WindowsSet, delivery: Delivery, deps: Deps) -> WindowsEntry:
    if req.cell is not None:
        await known_cell(deps, req.cell)
    await deps.store.set_windows(req.owner(), req.windows)
    deps.wake()
    return _windows_entry(req.owner(), req.windows, deps.clock.now())


async def windows_clear(req: WindowsClear, delivery: Delivery, deps: Deps) -> WindowsEntry:
    held = (await deps.store.window_sets()).get(req.owner())
    if held is None:
        raise RpcFailure("not_found", f"{req.owner()} has no maintenance windows")
    await deps.store.set_windows(req.owner(), None)
    deps.wake()
    return _windows_entry(req.owner(), held, deps.clock.now())


async def windows_list(req: WindowsList, delivery: Delivery, deps: Deps) -> list[WindowsEntry]:
    now = deps.clock.now()
    sets = await deps.store.window_sets()
    return [_windows_entry(owner, sets[owner], now) for owner in sorted(sets)]


def rpc_routes(deps: Deps) -> list[Route]:
    return [
        route(WindowsSet, windows_set, deps),
        route(WindowsClear, windows_clear, deps),
        route(WindowsList, windows_list, deps),
    ]
