"""Substrate's Grafana dashboards, as code (the official Grafana Foundation SDK).

``python -m observability.dashboards`` writes them to ``compose/grafana/dashboards/*.json``,
where compose's Grafana is provisioned from; ``--check`` exits 1 if a file is not what this
module makes (CI runs it, so the files never drift from the code). Every query here is also
run against a real Prometheus scraping a running system (tests/e2e/test_observability.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

OUT = Path(__file__).resolve().parents[1] / "compose" / "grafana" / "dashboards"
# Every panel reads the data source the dashboard's variable picks (compose provisions one,
# compose/grafana/provisioning/datasources; a site with several Prometheus picks its own).
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# The variables a query may filter on, and what "All" gives them (the tests run every query
# with that).
VARIABLES = {
    "stage": "label_values(substrate_cells, stage)",
    "release": "label_values(substrate_rollout_cells, release)",
}
ALL = ".*"
# Each release's rollout on the time axis: when one appears, and when it halts.
ANNOTATIONS = (
    (
        "Rollouts started",
        "max by (version) (substrate_rollout_state) unless max by (version) "
        "(substrate_rollout_state offset 1m)",
        "green",
    ),
    ("Releases halted", "max by (version, stage) (substrate_rollout_halted_release) > 0", "red"),
)


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat": one current value


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


BOARDS = (
    Board(
        "substrate-fleet",
        "Substrate / Fleet",
        (
            Panel(
                "Cells by stage and status",
                (
                    q(
                        'sum by (stage, status) (substrate_cells{stage=~"$stage"})',
                        "{{stage}} {{status}}",
                    ),
                ),
            ),
            Panel(
                "Cells by installed release",
                (
                    q(
                        "sum by (stage, release) "
                        '(substrate_rollout_cells{stage=~"$stage", release=~"$release"})',
                        "{{stage}} {{release}}",
                    ),
                ),
            ),
            Panel(
                "Oldest heartbeat among online cells",
                (q("substrate_cell_heartbeat_age_max_seconds", "age"),),
                unit="s",
            ),
            Panel(
                "Online cells behind on flags",
                (q("substrate_cells_flags_behind", "behind"),),
                kind="stat",
            ),
            Panel(
                "Infrastructure compliance",
                (q("sum by (state) (substrate_infra_cells)", "{{state}}"),),
            ),
            Panel(
                "Nearest infrastructure deadline",
                (q("substrate_infra_nearest_deadline_seconds", "seconds left"),),
                unit="s",
                kind="stat",
            ),
            Panel(
                "Infrastructure reminders sent (1 h)",
                (q("increase(substrate_infra_reminders_total[1h])", "reminders"),),
            ),
        ),
    ),
    Board(
        "substrate-rollouts",
        "Substrate / Rollouts",
        (
            Panel(
                "Rollouts active and halted",
                (
                    q("substrate_rollouts_active", "active"),
                    q("substrate_rollouts_halted", "halted"),
                ),
            ),
            Panel(
                "Rollout state and stage",
                (
                    q(
                        "max by (version, state, stage) (substrate_rollout_state)",
                        "{{version}} {{state}} in {{stage}}",
                    ),
                ),
            ),
            Panel("Wave of each rollout", (q("substrate_rollout_wave", "{{version}}"),)),
            Panel(
                "Progress: cells on each release",
                (
                    q(
                        "sum by (release) "
                        '(substrate_rollout_cells{stage=~"$stage", release=~"$release"})',
                        "{{release}}",
                    ),
                ),
            ),
            Panel(
                "Desired states sent per second",
                (q("rate(substrate_rollout_desired_states_total[1m])", "sent"),),
            ),
            Panel(
                "Halts (1 h)",
                (q("sum by (stage) (increase(substrate_rollout_halts_total[1h]))", "{{stage}}"),),
            ),
            Panel(
                "Upgrade duration, p90 by outcome",
                (
                    q(
                        "histogram_quantile(0.9, sum by (le, outcome) "
                        "(rate(substrate_upgrade_duration_seconds_bucket[5m])))",
                        "{{outcome}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Controller step time, p90",
                (
                    q(
                        "histogram_quantile(0.9, sum by (le) "
                        "(rate(substrate_rollout_step_seconds_bucket[5m])))",
                        "p90",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Maintenance stay, p90",
                (
                    q(
                        "histogram_quantile(0.9, sum by (le) "
                        "(rate(substrate_cell_maintenance_duration_seconds_bucket[5m])))",
                        "p90",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Longest maintenance now",
                (q("substrate_cell_maintenance_age_max_seconds", "age"),),
                unit="s",
                kind="stat",
            ),
        ),
    ),
    Board(
        "substrate-flags",
        "Substrate / Flags",
        (
            Panel(
                "Central evaluations by reason",
                (q("sum by (reason) (rate(substrate_flag_evaluations_total[1m]))", "{{reason}}"),),
            ),
            Panel(
                "Snapshot version", (q("substrate_flags_snapshot_version", "version"),), kind="stat"
            ),
            Panel(
                "Snapshots sent to cells",
                (
                    q(
                        "sum by (why, outcome) (rate(substrate_flags_snapshots_sent_total[1m]))",
                        "{{why}} {{outcome}}",
                    ),
                ),
            ),
        ),
    ),
    Board(
        "substrate-bus",
        "Substrate / Bus",
        (
            Panel(
                "Service queue depths",
                (
                    q(
                        'sum by (queue) (rabbitmq_detailed_queue_messages{queue!~"cell\\\\..*"})',
                        "{{queue}}",
                    ),
                ),
            ),
            Panel(
                "Dead letters",
                (
                    q(
                        'sum by (queue) (rabbitmq_detailed_queue_messages{queue=~".*\\\\.dead"})',
                        "{{queue}}",
                    ),
                ),
            ),
            Panel(
                "Published per second",
                (
                    q(
                        "sum by (type, outcome) (rate(substrate_bus_published_messages_total[1m]))",
                        "{{type}} {{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Consumed per second",
                (
                    q(
                        "sum by (queue, outcome) (rate(substrate_bus_consumed_messages_total[1m]))",
                        "{{queue}} {{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Request latency (operators' requests, by service), p50 and p99",
                (
                    q(
                        "histogram_quantile(0.5, sum by (le, queue) "
                        '(rate(substrate_bus_handling_seconds_bucket{queue=~".*\\\\.rpc"}[5m])))',
                        "{{queue}} p50",
                    ),
                    q(
                        "histogram_quantile(0.99, sum by (le, queue) "
                        '(rate(substrate_bus_handling_seconds_bucket{queue=~".*\\\\.rpc"}[5m])))',
                        "{{queue}} p99",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Handling latency (cell reports and events, delivery to ack), p99",
                (
                    q(
                        "histogram_quantile(0.99, sum by (le, queue) "
                        '(rate(substrate_bus_handling_seconds_bucket{queue!~".*\\\\.rpc"}[5m])))',
                        "{{queue}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Outbox: events waiting to be published",
                (q("sum by (service) (substrate_outbox_pending)", "{{service}}"),),
            ),
            Panel(
                "Redis answering, by service",
                (q("min by (service) (substrate_redis_up)", "{{service}}"),),
                kind="stat",
            ),
            Panel(
                "Broker alarms",
                (
                    q("max(rabbitmq_alarms_memory_used_watermark)", "memory"),
                    q("max(rabbitmq_alarms_free_disk_space_watermark)", "disk"),
                ),
            ),
        ),
    ),
)


def build(board: Board) -> Dashboard:
    dashboard = (
        Dashboard(board.title)
        .uid(board.uid)
        .tags(["substrate", "generated"])
        .refresh("30s")
        .time("now-1h", "now")
    )
    dashboard = dashboard.with_variable(
        DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    for name, values in VARIABLES.items():
        dashboard = dashboard.with_variable(
            QueryVariable(name)
            .label(name.capitalize())
            .datasource(DATASOURCE)
            .query(values)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(True)
            .all_value(ALL)
            .multi(True)
        )
    for title, expr, colour in ANNOTATIONS:
        dashboard = dashboard.annotation(
            AnnotationQuery().name(title).datasource(DATASOURCE).expr(expr).icon_color(colour)
            .enable(True)
        )  # fmt: skip
    for panel in board.panels:
        built = (Stat() if panel.kind == "stat" else Timeseries()).title(panel.title)
        built = built.unit(panel.unit).datasource(DATASOURCE).height(8).span(12)
        for i, query in enumerate(panel.queries):
            built = built.with_target(
                Dataquery()
                .expr(query.expr)
                .legend_format(query.legend)
                .ref_id(chr(ord("A") + i))
                .datasource(DATASOURCE)
            )
        dashboard = dashboard.with_panel(built)
    return dashboard


def rendered(board: Board) -> str:
    return json.dumps(build(board).build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def expressions() -> list[str]:
    """Every PromQL expression on every dashboard, its variables as "All" sets them."""
    found = [query.expr for board in BOARDS for panel in board.panels for query in panel.queries]
    return [with_all(expr) for expr in found]


def with_all(expr: str) -> str:
    for name in VARIABLES:
        expr = expr.replace(f"${name}", ALL)
    return expr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a dashboard file differs from what the code makes",
    )
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for board in BOARDS:
        path = OUT / f"{board.uid}.json"
        text = rendered(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run `make dashboards`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
