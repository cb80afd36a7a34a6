"""The rollout service's metrics (the bus's own are in common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from common.vocabulary import ACTIVE_STATES, REGISTERED, STAGES, TERMINAL_PHASES
from services.rollout.model import CellFacts, Rollout

CELLS_BY_RELEASE = Gauge(
    "substrate_rollout_cells",
    "Registered cells by stage and installed release ('none': nothing installed yet)",
    ["stage", "release"],
)
STATE = Gauge(
    "substrate_rollout_state",
    "1 for each release's current rollout state and stage (recent releases only)",
    ["version", "state", "stage"],
)
WAVE = Gauge(
    "substrate_rollout_wave", "The current wave of a release in its stage (0: first)", ["version"]
)
ACTIVE = Gauge("substrate_rollouts_active", "Rollouts in progress, soaking, halted or paused")
HALTED = Gauge("substrate_rollouts_halted", "Rollouts halted and waiting for an operator")
HALTED_RELEASE = Gauge(
    "substrate_rollout_halted_release",
    "1 while a recent release's rollout is halted by the controller (failures or unhealthy "
    "verdicts past its budget), by the stage it is in; 0 otherwise",
    ["version", "stage"],
)
HALTS = Counter("substrate_rollout_halts", "Rollouts halted, by stage", ["stage"])
LEADER = Gauge(
    "substrate_rollout_leader", "1 while this replica holds the rollout controller's lease"
)
FENCE_LOST = Counter(
    "substrate_rollout_fence_lost",
    "Controller steps refused because another replica took the lease meanwhile",
)
ASSIGNED = Counter("substrate_rollout_desired_states", "Desired states sent to cells")
STEP_DURATION = Histogram(
    "substrate_rollout_step_seconds",
    "The leading controller's steps, and how long each took (between rollouts a step over "
    "an unchanged fleet is skipped and takes next to nothing)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UPGRADE_DURATION = Histogram(
    "substrate_upgrade_duration_seconds",
    "From a desired state being sent to the cell reporting its outcome, by outcome",
    ["outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
# Every stage's and outcome's series exist from the start, at 0: a dashboard's rate() and an
# alert see "none yet" rather than "no data".
for _stage in STAGES:
    HALTS.labels(_stage)
for _outcome in sorted(TERMINAL_PHASES):
    UPGRADE_DURATION.labels(_outcome)

# Only the newest rollouts get state series, so old releases do not pile up label sets.
SHOWN_ROLLOUTS = 10


def count_release(counts: dict[tuple[str, str], int], cell: CellFacts, by: int = 1) -> None:
    """Count a registered cell by (stage, the release it runs): what ``observe`` shows. With
    ``by`` -1, take it out (a count that falls to 0 goes)."""
    if cell.status in REGISTERED:
        key = (cell.stage, cell.installed_release or "none")
        n = counts.get(key, 0) + by
        if n:
            counts[key] = n
        else:
            counts.pop(key, None)


def observe(rollouts: list[Rollout], counts: dict[tuple[str, str], int]) -> None:
    """Set the gauges from one controller step's view (``counts``: ``count_release`` over its
    cells). Between clearing a gauge and setting it again nothing else runs, so a scrape never
    sees it empty."""
    CELLS_BY_RELEASE.clear()
    for (stage, release), n in counts.items():
        CELLS_BY_RELEASE.labels(stage, release).set(n)
    for stage in STAGES:  # a stage with no cell still shows, as 0
        if not any(s == stage for s, _ in counts):
            CELLS_BY_RELEASE.labels(stage, "none").set(0)
    STATE.clear()
    WAVE.clear()
    HALTED_RELEASE.clear()
    for r in sorted(rollouts, key=lambda r: r.semver, reverse=True)[:SHOWN_ROLLOUTS]:
        STATE.labels(r.version, r.state, r.stage).set(1)
        WAVE.labels(r.version).set(r.wave)
        HALTED_RELEASE.labels(r.version, r.stage).set(r.state == "halted")
    ACTIVE.set(sum(r.state in ACTIVE_STATES for r in rollouts))
    HALTED.set(sum(r.state == "halted" for r in rollouts))
