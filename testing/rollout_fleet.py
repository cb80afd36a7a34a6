"""A fleet in memory for the rollout model's tests: the simulator plays the controller's loop
(model.step, catch_up, superseded) and the cells' agents, and records what reached which cell,
in which order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from common.releases import Release
from services.rollout.model import (
    CellFacts,
    Rollout,
    RolloutPolicy,
    SoakTimes,
    catch_up,
    new_rollout,
    required_versions,
    step,
    superseded,
)
from services.rollout.model.windows import Windows

T0 = datetime(2026, 11, 1, tzinfo=UTC)
V1, V2, V3 = "2026.11.1", "2026.11.2", "2026.11.3"
NO_SOAK = RolloutPolicy(soak_seconds=SoakTimes(staging=0, saas=0, dedicated=0))
Outcome = Callable[[CellFacts, str], str]  # (cell, version) -> "succeeded" | "failed" | "silent"


def release(version: str, *, reversible: bool = True) -> Release:
    return Release.model_validate({
        "version": version, "reversible": reversible,
        "components": [{"name": "api", "image": "r/api", "digest": "sha256:" + "a" * 64}],
    })  # fmt: skip


def ok(cell: CellFacts, version: str) -> str:
    return "succeeded"


class Fleet:
    """Cells and rollouts in memory; ``run`` alternates controller steps and agent reports."""

    def __init__(self, policy: RolloutPolicy = NO_SOAK) -> None:
        self.policy = policy
        self.now = T0
        self.cells: dict[str, CellFacts] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.sent: list[tuple[datetime, str, str | None]] = []  # (when, cell, version)
        self.events: list[object] = []
        self.generation = 0
        self.outcome: Outcome = ok
        # Set: releases carry health checks, and this is each cell's verdict after its bake
        # (None: still baking).
        self.verdict: Callable[[CellFacts, str], str | None] | None = None
        self.windows = Windows()

    def add(self, n: int, stage: str, *, installed: str | None = V1, status: str = "online",
            prefix: str | None = None) -> list[str]:  # fmt: skip
        ids = []
        head = prefix or stage[:3]
        for _ in range(n):
            cid = f"{head}-{sum(c.startswith(head) for c in self.cells):03d}"
            self.cells[cid] = CellFacts(
                id=cid, stage=stage, status=status, installed_release=installed,  # type: ignore[arg-type]
            )  # fmt: skip
            ids.append(cid)
        return ids

    def publish(self, version: str, *, reversible: bool = True, required: bool = False) -> None:
        published = release(version, reversible=reversible).model_copy(
            update={"required": required}
        )
        self.rollouts[version] = new_rollout(published, self.now)

    def set(self, cell_id: str, **changes: object) -> None:
        self.cells[cell_id] = replace(self.cells[cell_id], **changes)  # type: ignore[arg-type]

    def tick(self) -> None:
        """One controller step, as controller.tick does it."""
        for v in superseded(list(self.rollouts.values())):
            self.rollouts[v] = self.rollouts[v].model_copy(update={"state": "superseded"})
        required = required_versions(list(self.rollouts.values()))
        for r in sorted(self.rollouts.values(), key=lambda r: r.semver):
            d = step(
                r, list(self.cells.values()), self.policy, self.now, required, windows=self.windows
            )
            self.rollouts[r.version] = d.rollout
            self.events += d.events
            self._assign(d.assign)
        cells, rollouts = list(self.cells.values()), list(self.rollouts.values())
        self._assign(catch_up(cells, rollouts, self.now, None, required, windows=self.windows))

    def _assign(self, assigns: list) -> None:  # type: ignore[type-arg]
        for a in assigns:
            cell = self.cells[a.cell_id]
            self.generation += 1
            self.cells[a.cell_id] = replace(
                cell, desired_version=a.version, desired_generation=self.generation,
                desired_at=self.now, previous_version=a.previous,
                desired_bake=0.0 if self.verdict else None, desired_for=a.path_to,
            )  # fmt: skip
            self.sent.append((self.now, a.cell_id, a.version))

    def agents(self) -> None:
        """Every online cell with an unreported desired state reports its outcome."""
        for cell in list(self.cells.values()):
            if cell.status != "online" or cell.desired_generation is None:
                continue
            if cell.report_generation == cell.desired_generation:
                continue
            result = self.outcome(cell, cell.desired_version or "")
            if result == "silent":
                continue
            update: dict[str, object] = {
                "report_generation": cell.desired_generation,
                "report_phase": result if result == "succeeded" else "rolled_back",
                "report_error": None if result == "succeeded" else "health check failed",
            }
            if result == "succeeded":
                update["installed_release"] = cell.desired_version
            if result == "succeeded" and self.verdict is not None:
                verdict = self.verdict(cell, cell.desired_version or "")
                if verdict is None:
                    continue  # baking
                update["report_verdict"] = verdict
                if verdict != "healthy":
                    update["report_check"] = "web"
                    update["report_error"] = "status 503, wants 200"
                if verdict == "unhealthy":
                    # A reversible release goes back by itself.
                    update["report_phase"] = "rolled_back"
                    update["installed_release"] = cell.installed_release
            self.cells[cell.id] = replace(cell, **update)  # type: ignore[arg-type]

    def run(self, *, seconds: float = 0, max_ticks: int = 200, step_seconds: float = 1) -> None:
        """Tick, let agents answer, move time; until nothing changes (and ``seconds`` passed)."""
        end = self.now + timedelta(seconds=seconds)
        for _ in range(max_ticks):
            before = (dict(self.rollouts), dict(self.cells))
            self.tick()
            self.agents()
            soaking = any(r.state == "soaking" for r in self.rollouts.values())
            if (
                (dict(self.rollouts), dict(self.cells)) == before
                and self.now >= end
                and not soaking
            ):
                return
            self.now += timedelta(seconds=step_seconds)

    def r(self, version: str) -> Rollout:
        return self.rollouts[version]

    def got(self, version: str | None, stage: str | None = None) -> list[str]:
        return sorted({c for _, c, v in self.sent if v == version
                       and (stage is None or self.cells[c].stage == stage)})  # fmt: skip

    def installed(self, cell_id: str) -> str | None:
        return self.cells[cell_id].installed_release

    def of_stage(self, stage: str) -> list[str]:
        return sorted(c for c, cell in self.cells.items() if cell.stage == stage)


def standard_fleet(policy: RolloutPolicy = NO_SOAK, dedicated: int = 20) -> Fleet:
    fleet = Fleet(policy)
    fleet.add(2, "staging")
    fleet.add(1, "saas")
    fleet.add(dedicated, "dedicated")
    return fleet
