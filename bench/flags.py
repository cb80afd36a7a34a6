"""Flag evaluation speed: our engine next to a hand-written function of the same rule and, where
they install, the Unleash (yggdrasil) and Flagsmith engines; and `flags preview` over a large
simulated fleet.

    python -m bench.flags [--cells 10000] [--seconds 2] [--preview-cells 100000]

The rule: release >= 2026.11.0 (the version gate) AND (stage in [staging, saas] OR org in a
50-entry list OR a 25% split on the cell id). Each engine is measured two ways:

- one cell, asked again and again: what a cell agent does (it only ever evaluates itself);
- round-robin over N different cells: what the flags service does for a fleet.

Every engine's share of cells answered "on" is printed beside its rate, so a rule that was
translated wrongly shows.

Everything runs in this process: the engine, and the flags service's own preview and store
(``services.flags``), called directly; no service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from common.flags import Flag, Snapshot
from common.fleet import FleetCell, grouped
from services.flags.model import preview
from services.flags.store import FlagsStore

KEY = "new-editor"
STAGES = ["staging", "saas"]
ORGS = [f"org-{i:03d}" for i in range(50)]
MIN_RELEASE = "2026.11.0"
RELEASES = ["2026.10.4", "2026.11.0", "2026.11.3", "2026.12.0-rc.1", "2026.12.1", "2027.1.0"]

FLAG = Flag.model_validate({
    "key": KEY, "owner": "bench", "requires_release": MIN_RELEASE,
    "rules": [
        {"name": "early stages", "when": [{"attribute": "stage", "op": "in", "values": STAGES}],
         "serve": "on"},
        {"name": "beta orgs", "when": [{"attribute": "org", "op": "in", "values": ORGS}],
         "serve": "on"},
        {"name": "a quarter", "split": {"on": 25, "off": 75}},
    ],
})  # fmt: skip


def fleet(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"cell-{i:06d}", "stage": rng.choice(["staging", "saas", "dedicated", "dedicated"]),
         "org": f"org-{rng.randrange(400):03d}", "region": "eu-west-1",
         "installed_release": rng.choice(RELEASES), "agent_version": "1.4.0"}
        for i in range(n)
    ]  # fmt: skip


# -- the contenders -------------------------------------------------------------------------------


def ours() -> Callable[[dict[str, Any]], bool]:
    snapshot = Snapshot(1, {KEY: FLAG})
    evaluate = snapshot.evaluate
    return lambda cell: evaluate(KEY, cell).value is True


def hand_written() -> Callable[[dict[str, Any]], bool]:
    """The rule as a developer would write it for this one flag: sets built once, the version
    and the bucket worked out on each call."""
    stages, orgs = frozenset(STAGES), frozenset(ORGS)
    minimum = (2026, 11, 0)

    def version(text: str | None) -> tuple[tuple[int, int, int], bool] | None:
        if not text:
            return None
        core, _, pre = text.partition("-")
        parts = core.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return (int(parts[0]), int(parts[1]), int(parts[2])), bool(pre)

    def rule(cell: dict[str, Any]) -> bool:
        v = version(cell.get("installed_release"))
        if v is None or v[0] < minimum or (v[0] == minimum and v[1]):
            return False
        if cell.get("stage") in stages or cell.get("org") in orgs:
            return True
        digest = hashlib.sha256(f"{KEY}:{cell['id']}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % 10_000 < 2_500

    return rule


def hand_written_memo() -> Callable[[dict[str, Any]], bool]:
    """The same, remembering each version's verdict and each cell's bucket, as our engine
    does: the stricter baseline."""
    plain = hand_written()
    stages, orgs = frozenset(STAGES), frozenset(ORGS)
    gate_memo: dict[str | None, bool] = {}
    bucket_memo: dict[str, bool] = {}

    def rule(cell: dict[str, Any]) -> bool:
        release = cell.get("installed_release")
        ok = gate_memo.get(release)
        if ok is None:
            ok = gate_memo[release] = plain({"installed_release": release, "stage": "staging",
                                             "id": ""})  # fmt: skip
        if not ok:
            return False
        if cell.get("stage") in stages or cell.get("org") in orgs:
            return True
        cell_id = cell["id"]
        on = bucket_memo.get(cell_id)
        if on is None:
            digest = hashlib.sha256(f"{KEY}:{cell_id}".encode()).digest()
            on = bucket_memo[cell_id] = int.from_bytes(digest[:8], "big") % 10_000 < 2_500
        return on

    return rule


def unleash() -> Callable[[dict[str, Any]], bool] | None:
    try:
        from yggdrasil_engine.engine import UnleashEngine
    except ImportError:
        return None
    gate = {"contextName": "installed_release", "operator": "SEMVER_LT", "value": MIN_RELEASE,
            "inverted": True}  # fmt: skip
    state = {"version": 2, "features": [{
        "name": KEY, "enabled": True, "type": "release",
        "strategies": [
            {"name": "default", "constraints": [
                gate, {"contextName": "stage", "operator": "IN", "values": STAGES}]},
            {"name": "default", "constraints": [
                gate, {"contextName": "org", "operator": "IN", "values": ORGS}]},
            {"name": "flexibleRollout", "constraints": [gate],
             "parameters": {"rollout": "25", "stickiness": "userId", "groupId": KEY}},
        ],
    }]}  # fmt: skip
    engine = UnleashEngine()
    engine.take_state(json.dumps(state))

    def rule(cell: dict[str, Any]) -> bool:
        context = {"userId": cell["id"], "properties": {
            "stage": cell["stage"], "org": cell["org"],
            "installed_release": cell["installed_release"]}}  # fmt: skip
        return bool(engine.check_enabled(KEY, context).is_enabled)

    return rule


def flagsmith() -> Callable[[dict[str, Any]], bool] | None:
    try:
        from flag_engine.engine import get_evaluation_result
    except ImportError:
        return None
    gate = {"property": "installed_release", "operator": "GREATER_THAN_INCLUSIVE",
            "value": f"{MIN_RELEASE}:semver"}  # fmt: skip
    segment = {"key": "beta", "name": "beta", "rules": [{
        "type": "ALL", "conditions": [gate],
        "rules": [{"type": "ANY", "conditions": [
            {"property": "stage", "operator": "IN", "value": ",".join(STAGES)},
            {"property": "org", "operator": "IN", "value": ",".join(ORGS)},
            {"property": "$.identity.key", "operator": "PERCENTAGE_SPLIT", "value": "25"},
        ]}],
    }], "overrides": [{"key": KEY, "name": KEY, "enabled": True, "value": True}]}  # fmt: skip
    base = {
        "environment": {"key": "bench", "name": "bench"},
        "features": {KEY: {"key": KEY, "name": KEY, "enabled": False, "value": False}},
        "segments": {"beta": segment},
    }

    def rule(cell: dict[str, Any]) -> bool:
        context = {**base, "identity": {"identifier": cell["id"], "key": cell["id"], "traits": {
            "stage": cell["stage"], "org": cell["org"],
            "installed_release": cell["installed_release"]}}}  # fmt: skip
        result: Any = get_evaluation_result(context)
        return bool(result["flags"][KEY]["enabled"])

    return rule


# -- measuring ------------------------------------------------------------------------------------


def rate(rule: Callable[[dict[str, Any]], bool], cells: list[dict[str, Any]], seconds: float
         ) -> tuple[float, float]:  # fmt: skip
    """Evaluations per second over ``cells`` round-robin, and the share answered on."""
    on = sum(rule(c) for c in cells) / len(cells)  # also warms any cache, as a running system is
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for c in cells:
            rule(c)
        done += len(cells)
    return done / elapsed, on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--preview-cells", type=int, default=100_000)
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/14",
        help="an empty Redis database, for the read of the fleet",
    )
    args = parser.parse_args()
    cells = fleet(args.cells)
    one = [
        next(c for c in cells if c["stage"] == "dedicated" and c["installed_release"] == "2027.1.0")
    ]
    contenders = {
        "ours (common.flags)": ours(),
        "hand-written function": hand_written(),
        "hand-written, memoised": hand_written_memo(),
        "Unleash (yggdrasil engine)": unleash(),
        "Flagsmith (flag-engine)": flagsmith(),
    }
    results: dict[str, tuple[float, float, float]] = {}
    for name, rule in contenders.items():
        if rule is None:
            print(f"{name}: not installed (pip install '.[bench]')")
            continue
        # SDKs are far slower: a tenth of the time gives as steady a figure.
        budget = args.seconds if name.startswith(("ours", "hand")) else args.seconds / 2
        single, _ = rate(rule, one * 1000, budget)
        fleet_rate, on = rate(rule, cells, budget)
        results[name] = (single, fleet_rate, on)
    print(f"\nrule: release >= {MIN_RELEASE} AND (stage in {STAGES} OR org in 50 orgs OR 25%)")
    print(f"{'engine':30}{'one cell':>14}{f'{args.cells:,} cells':>16}{'on':>8}")
    for name, (single, fleet_rate, on) in results.items():
        print(f"{name:30}{single:>12,.0f}/s{fleet_rate:>14,.0f}/s{on:>8.1%}")
    mine = results["ours (common.flags)"]
    for label in ("hand-written function", "hand-written, memoised"):
        hand = results[label]
        print(f"ours vs {label}: {mine[0] / hand[0]:.0%} (one cell), "
              f"{mine[1] / hand[1]:.0%} ({args.cells:,} cells)   target 30%")  # fmt: skip
    sdks = [v for k, v in results.items() if not k.startswith(("ours", "hand"))]
    if sdks:
        best = max(sdks, key=lambda v: v[1])
        print(f"ours vs the fastest SDK: {mine[0] / max(s[0] for s in sdks):.0f}x (one cell), "
              f"{mine[1] / best[1]:.0f}x ({args.cells:,} cells)   target 20x")  # fmt: skip

    big = fleet(args.preview_cells, seed=11)
    current = Snapshot(1, {KEY: FLAG})
    wider = FLAG.model_copy(update={"rules": (*FLAG.rules[:2], FLAG.rules[2].model_copy(
        update={"split": {"on": 50, "off": 50}}))})  # fmt: skip
    proposed = Snapshot(2, {KEY: wider})
    started = time.perf_counter()
    result = preview(KEY, current, proposed, grouped(FleetCell(**c).target() for c in big))
    took = time.perf_counter() - started
    print(
        f"\nflags preview (25% -> 50%) over {len(big):,} cells: {took * 1000:.0f} ms "
        f"({result.flipping:,} would flip)   target < 1 s"
    )
    read = asyncio.run(read_from_redis(big, args.redis_url))
    print(f"  + reading those cells from Redis (the service's fleet view): {read * 1000:.0f} ms")


async def read_from_redis(cells: list[dict[str, Any]], url: str) -> float:
    """The service's read of the fleet, from a scratch Redis database (emptied after)."""
    redis = aioredis.from_url(url, decode_responses=True)
    if await redis.dbsize():
        await redis.aclose()
        raise SystemExit(f"{url} is not empty; pick an empty database with --redis-url")
    store = FlagsStore(redis)
    try:
        packed = {c["id"]: FleetCell(**c, status="online").encode() for c in cells}
        await redis.hset(store.fleet.key, mapping=packed)
        started = time.perf_counter()
        read = await store.fleet.all()
        took = time.perf_counter() - started
        assert len(read) == len(cells)
        return took
    finally:
        await redis.flushdb()
        await redis.aclose()


if __name__ == "__main__":
    main()
