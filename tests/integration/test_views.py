"""What the operator's views over a whole fleet read, against real Redis: the flags view's
targets kept in the same write as each fact (and entered at start for cells known before),
the registry's pages read ahead for a listing of every cell, and hashes read as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from common.fleet import FleetView, grouped
from common.messages import (
    CellCreated,
    CellDecommissioned,
    CellOffline,
    CellRegistered,
    InfraComplianceChanged,
)
from common.requests.registry import MAX_PAGE, CellsList, ListedCell
from common.scripts import Hashes
from services.registry.pages import FRESH_SECONDS, Pages
from testing.services import Services

T0 = datetime(2026, 12, 1, tzinfo=UTC)
PREFIX = "views-test:"


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(services.redis_url, decode_responses=True)
    yield client
    keys = [k async for k in client.scan_iter(PREFIX + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def test_targets_follow_every_fact_and_cells_alike_are_one_group(
    redis: aioredis.Redis,
) -> None:
    view = FleetView(redis, PREFIX, with_targets=True)
    for i in range(6):
        await view.apply(CellCreated(at=at(0), cell_id=f"t-{i}", stage="dedicated",
                                     region="eu-west-1", org=f"org-{i % 2}"))  # fmt: skip
        await view.apply(CellRegistered(at=at(1), cell_id=f"t-{i}", stage="dedicated",
                                        region="eu-west-1", org=f"org-{i % 2}",
                                        aws_account_id="123456789012", agent_version="1.0",
                                        installed_release="2026.1.0"))  # fmt: skip
    await view.apply(CellOffline(at=at(2), cell_id="t-0"))
    await view.apply(CellDecommissioned(at=at(3), cell_id="t-1"))
    await view.apply(InfraComplianceChanged(at=at(4), cell_id="t-2", status="out_of_sla",
                                            template_version="3"))  # fmt: skip

    async def as_sets(groups: list) -> set:  # type: ignore[type-arg]
        return {(g.values, g.held, frozenset(g.ids)) for g in groups}

    expected = grouped(c.target() for c in await view.all())
    assert await as_sets(await view.groups()) == await as_sets(expected)
    assert len(await view.groups()) == 5, "t-3 and t-5 are alike; t-4 is of another org"

    # A view kept before targets were: entered at start, never over an entry a fact wrote.
    await redis.hdel(PREFIX + "targets", "t-3", "t-4")
    await redis.hset(PREFIX + "targets", "t-5", '["written","by","a","fact","now","online",false]')
    assert await view.index_targets() == 2
    assert await view.index_targets() == 0
    groups = await as_sets(await view.groups())
    assert ((("written", "by", "a", "fact", "now", "online"), False, frozenset({"t-5"}))
            in groups)  # fmt: skip
    assert any("t-3" in ids and "t-4" not in ids for _, _, ids in groups)


async def test_hashes_read_as_json_are_the_hashes(redis: aioredis.Redis) -> None:
    records = {
        "a": {"org": "ünïcode ✓", "quote": 'say "hi"\\n', "empty": "", "ctl": "\x01\t"},
        "b": {"n": "12"},
    }
    for cell_id, fields in records.items():
        await redis.hset(PREFIX + cell_id, mapping=fields)  # type: ignore[arg-type]
    read = await Hashes(redis).as_json(PREFIX, ids=["a", "missing", "b"])
    assert read == [records["a"], {}, records["b"]]


async def test_a_listing_of_every_cell_finds_its_next_page_made_ahead() -> None:
    """A full page of the largest size starts making the next; the request for it gets that
    page (while fresh, and only for the same filters after the same id)."""
    made: list[CellsList] = []
    cell = ListedCell(id="x", stage="dedicated", region="eu-west-1", org="o", status="online",
                      created_at=datetime.now(UTC))  # fmt: skip

    async def make(req: CellsList) -> list[ListedCell]:
        made.append(req)
        return [cell.model_copy(update={"id": f"{req.after or ''}>{i:05d}"})
                for i in range(req.limit)]  # fmt: skip

    now = [100.0]
    pages = Pages(make, lambda: now[0])
    first = await pages.page(CellsList(limit=MAX_PAGE))
    await asyncio.sleep(0)
    assert [r.after for r in made] == [None, first[-1].id], "the next made ahead"
    second = await pages.page(CellsList(limit=MAX_PAGE, after=first[-1].id))
    await asyncio.sleep(0)
    assert len(made) == 3 and second[0].id.startswith(first[-1].id)
    # Other filters after the same id: made for themselves.
    await pages.page(CellsList(limit=MAX_PAGE, after=second[-1].id, stage="saas"))
    await asyncio.sleep(0)
    assert made[-1].stage == "saas" and len(made) == 5
    # A page made ahead too long ago is made again.
    now[0] += FRESH_SECONDS + 1
    await pages.page(CellsList(limit=MAX_PAGE, after=second[-1].id))
    await asyncio.sleep(0)
    assert len(made) == 7 and made[-2].after == second[-1].id
    # A page of another size makes nothing ahead.
    await pages.page(CellsList(limit=10))
    await asyncio.sleep(0)
    assert len(made) == 8
