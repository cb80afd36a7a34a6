"""`substratectl rollout ...`: the plan, state and progress of rollouts, the operator's actions
on them, why a cell is where it is, and the rollout policy."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from common import times
from common.fields import printable
from common.requests import Request
from common.requests.rollout import (
    Plan,
    PolicySet,
    PolicyShow,
    RolloutAbort,
    RolloutApprove,
    RolloutExplain,
    RolloutList,
    RolloutPause,
    RolloutPlan,
    RolloutPolicy,
    RolloutPromote,
    RolloutResume,
    RolloutRetry,
    RolloutSchedule,
    RolloutShow,
    RolloutView,
    StageCounts,
    StagePolicy,
)
from common.vocabulary import FINISHED_STATES, STAGES
from substratectl.context import Ctl, read_mapping_file
from substratectl.conventions import add_watch, add_yes, seconds
from substratectl.output import console, fields, moment, on_terminal, plain, plural, table

COUNTS = tuple(name for name in StageCounts.model_fields if name != "total")


def plan_text(result: Plan) -> str:
    lines = [f"plan for {result.version} (nothing is sent):"]
    if result.refused:
        lines.insert(0, f"publishing it would be refused: {printable(result.refused)}")
    for stage, waves in result.stages.items():
        if not waves:
            lines.append(f"  {stage}: no cells")
        for n, cells in enumerate(waves, 1):
            label = "canary" if stage == "dedicated" and n == 1 else f"wave {n}"
            lines.append(f"  {stage} {label}: {plural(len(cells), 'cell')}: {', '.join(cells)}")
    if result.checks:
        bakes = ", ".join(f"{stage} {s:g}s" for stage, s in result.bake_seconds.items())
        lines.append(f"  health checks: {', '.join(result.checks)}; bake: {bakes}")
    else:
        lines.append("  health checks: none (a cell counts as updated once it applies it)")
    when = [
        {"cell": c, "sent at": t, "window": result.not_before.get(c, "-")}
        for c, t in sorted(result.predicted.items(), key=lambda pair: (pair[1], pair[0]))
    ]
    if when:
        lines += [
            "",
            "predicted, if the rollout started now and every cell applied it at once"
            " (window: when a held cell's maintenance window opens):",
            table(when, ["cell", "sent at", "window"]),
        ]
    if result.waits_for_approval:
        lines.append(
            f"{result.waits_for_approval} and the stages after it wait for an approval"
            " (rollout approve): no time is predicted for their cells"
        )
    paths = [{"cell": c, "path": " -> ".join(p)} for c, p in sorted(result.paths.items())]
    if paths:
        lines += ["", "upgrade paths (required releases first):", table(paths, ["cell", "path"])]
    skipped = [{"cell": c, "reason": r} for c, r in sorted(result.skipped.items())]
    if skipped:
        lines += ["", "skipped:", table(skipped, ["cell", "reason"])]
    return "\n".join(lines)


async def plan(ctl: Ctl) -> int:
    return await ctl.ask(RolloutPlan(version=ctl.args.version), plan_text)


def _where(r: RolloutView) -> str:
    wave = f" wave {r.wave} of {r.waves}" if r.waves else ""
    soak = f", soaking until {moment(r.soak_until)}" if r.state == "soaking" else ""
    waiting = f"; {printable(r.waiting)}" if r.waiting else ""
    return f"{r.version}: {r.state} in {r.stage}{wave}{soak}{waiting}"


def _gates(r: RolloutView) -> list[str]:
    """Who approved it into which stage, and the stages' scheduled starts."""
    lines = [f"approved into {stage} by {by}" for stage, by in r.approved.items()]
    lines += [f"{stage} starts at {moment(at)}" for stage, at in r.starts_at.items()]
    return lines


def _halt_lines(r: RolloutView, indent: str) -> list[str]:
    """Why it stopped, and each cell with its evidence (the check, what it saw)."""
    if not r.halt:
        return []
    return [
        f"{indent}{r.state}: {printable(r.halt.reason)}",
        *(f"{indent}  {f.cell_id}: {printable(f.error)}" for f in r.halt.failures),
    ]


def _rollout(r: RolloutView) -> str:
    lines = [_where(r), *_halt_lines(r, ""), *_gates(r)]
    rows = [{"stage": stage, **r.stages[stage].model_dump()} for stage in STAGES]
    lines.append(table(rows, ["stage", "total", *COUNTS]))
    return "\n".join(lines)


async def status(ctl: Ctl) -> int:
    return await ctl.ask(RolloutShow(version=ctl.args.version), _rollout)


async def list_rollouts(ctl: Ctl) -> int:
    columns = ["version", "state", "stage", "wave", "waves", "updated_at"]
    return await ctl.ask(RolloutList(), lambda rollouts: table(rollouts, columns))


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _progress_lines(r: RolloutView) -> list[str]:
    lines = [_where(r)]
    for stage in STAGES:
        c = r.stages[stage]
        if not c.total:
            lines.append(f"  {stage:<9} (no cells)")
            continue
        counts = c.model_dump()
        rest = ", ".join(f"{counts[k]} {k.replace('_', ' ')}" for k in COUNTS[1:] if counts[k])
        lines.append(
            f"  {stage:<9} {_bar(c.updated, c.total)} {c.updated}/{c.total} updated"
            + (f"; {rest}" if rest else "")
        )
    return lines + _halt_lines(r, "  ")


async def watch(ctl: Ctl) -> int:
    """Live progress until the rollout finishes or halts (exit 0 completed, 1 otherwise). On a
    terminal the frame is redrawn in place (rich's Live); elsewhere each changed frame is
    printed, and with --json each change is one JSON line."""
    if on_terminal() and not ctl.as_json:
        from rich.live import Live
        from rich.text import Text

        with Live(console=console(), auto_refresh=False) as live:
            return await _watch(
                ctl, lambda r: live.update(Text("\n".join(_progress_lines(r))), refresh=True)
            )
    if ctl.as_json:
        return await _watch(ctl, lambda r: print(json.dumps(plain(r), sort_keys=True), flush=True))
    return await _watch(ctl, lambda r: print("\n".join(_progress_lines(r)), flush=True))


async def _watch(ctl: Ctl, show: Callable[[RolloutView], None]) -> int:
    version = ctl.args.version
    last = None
    while True:
        r = await ctl.call(RolloutShow(version=version))
        version = r.version  # stay on one release once picked
        shown = r.model_dump(exclude={"updated_at"})
        if shown != last:
            last = shown
            show(r)
        if r.state in (*FINISHED_STATES, "halted") or ctl.args.once:
            return 0 if r.state == "completed" or ctl.args.once else 1
        await asyncio.sleep(ctl.args.interval)


async def _act(ctl: Ctl, request: Request[RolloutView], done: str) -> int:
    return await ctl.ask(request, lambda result: f"{done}: {_where(result)}")


async def pause(ctl: Ctl) -> int:
    return await _act(ctl, RolloutPause(version=ctl.args.version), "paused")


async def resume(ctl: Ctl) -> int:
    return await _act(ctl, RolloutResume(version=ctl.args.version), "resumed")


async def abort(ctl: Ctl) -> int:
    ctl.confirm(f"abort the rollout of {ctl.args.version}? It cannot be resumed")
    return await _act(ctl, RolloutAbort(version=ctl.args.version), "aborted")


async def approve(ctl: Ctl) -> int:
    request = RolloutApprove(version=ctl.args.version, stage=ctl.args.stage)
    return await _act(ctl, request, "approved")


async def promote(ctl: Ctl) -> int:
    request = RolloutPromote(version=ctl.args.version, reason=ctl.args.reason)
    return await _act(ctl, request, "soak skipped")


async def retry(ctl: Ctl) -> int:
    return await _act(ctl, RolloutRetry(version=ctl.args.version), "failed cells are sent it again")


async def schedule(ctl: Ctl) -> int:
    a = ctl.args
    at = None if a.cancel else a.at
    done = (
        f"{a.stage} starts as soon as it can" if a.cancel else f"{a.stage} starts at {moment(a.at)}"
    )
    return await _act(ctl, RolloutSchedule(version=a.version, stage=a.stage, at=at), done)


async def explain(ctl: Ctl) -> int:
    return await ctl.ask(
        RolloutExplain(id=ctl.args.cell),
        lambda r: f"{r.cell}: {r.reason}\n{printable(r.explanation)}",
    )


async def policy_show(ctl: Ctl) -> int:
    return await ctl.ask(PolicyShow(), _policy_text)


async def policy_set(ctl: Ctl) -> int:
    policy = read_mapping_file(Path(ctl.args.file), "a mapping of policy settings")
    return await ctl.ask(
        PolicySet.model_validate({"policy": policy}), lambda p: f"policy set:\n{_policy_text(p)}"
    )


def _policy_text(p: RolloutPolicy) -> str:
    soak, waves = p.soak_seconds, p.waves
    return fields(
        {
            "soak staging": f"{soak.staging:g}s",
            "soak saas": f"{soak.saas:g}s",
            "soak dedicated": f"{soak.dedicated:g}s (between waves)",
            "dedicated waves": f"canary {waves.canary}, then "
            + ", ".join(f"{f:.0%}" for f in waves.fractions)
            + " of the rest",
            "failure threshold": f"{p.failure_threshold} per wave",
            "progress deadline": f"{p.progress_deadline_seconds:g}s",
            "offline cells": p.offline_cells,
            "retry failed installs": f"after {p.retry_failed_seconds:g}s",
            "default health checks": ", ".join(c.name for c in p.health_checks) or "none",
            "approval (two-person rule)": ", ".join(p.approval_stages) or "none",
            **{f"{stage}": _stage_text(p.stages.of(stage)) for stage in STAGES},
        }
    )


def _stage_text(s: StagePolicy) -> str:
    budget = "the failure threshold" if s.failure_budget is None else str(s.failure_budget)
    cap = f", at most {s.max_updating} updating at once" if s.max_updating else ""
    return (
        f"bake {s.bake_seconds:g}s, watch {s.watch_seconds:g}s, failure budget {budget},"
        f" inconclusive: {s.inconclusive}{cap}"
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = sub.add_parser("rollout", help="how releases reach the fleet")
    cmds = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    p = cmds.add_parser(
        "plan", help="dry run: which cells a release reaches in which stage and wave, and why not"
    )
    p.add_argument("version")
    p.set_defaults(run=plan)

    p = cmds.add_parser("status", help="a rollout's state and cells per stage (default: newest)")
    p.add_argument("version", nargs="?")
    add_watch(p)
    p.set_defaults(run=status)

    p = cmds.add_parser("list", help="every release's rollout, newest first")
    p.set_defaults(run=list_rollouts)

    p = cmds.add_parser("watch", help="live progress until the rollout completes or halts")
    p.add_argument("version", nargs="?")
    p.add_argument(
        "--interval", type=seconds, default=1.0, help="seconds between refreshes (default 1)"
    )
    p.add_argument("--once", action="store_true", help="print the progress once and exit")
    p.set_defaults(run=watch)

    for name, fn, text in (
        ("pause", pause, "stop starting new waves and stages (cells updating finish)"),
        ("resume", resume, "continue a paused or halted rollout (a halt's failures are accepted)"),
        ("abort", abort, "stop for good; a reversible release's cells go back to the last one"),
    ):
        p = cmds.add_parser(name, help=text)
        p.add_argument("version")
        if name == "abort":
            add_yes(p, "abort")
        p.set_defaults(run=fn)

    p = cmds.add_parser(
        "approve", help="let a release into the stage it waits at (not by its publisher)"
    )
    p.add_argument("version")
    p.add_argument("--stage", choices=STAGES, help="approve a later stage ahead")
    p.set_defaults(run=approve)
    p = cmds.add_parser("promote", help="skip the rest of the current soak (audited)")
    p.add_argument("version")
    p.add_argument("--reason", required=True, help="why: goes into the audit log")
    p.set_defaults(run=promote)
    p = cmds.add_parser("retry", help="send the release again to the cells whose update failed")
    p.add_argument("version")
    p.add_argument(
        "--failed", action="store_true", required=True, help="the failed cells (required)"
    )
    p.set_defaults(run=retry)
    p = cmds.add_parser("schedule", help="a stage starts no earlier than a time")
    p.add_argument("version")
    p.add_argument("--stage", choices=STAGES, required=True)
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", type=times.at, help="a time (ISO 8601) or from now: 30m, 2h")
    when.add_argument("--cancel", action="store_true", help="clear the stage's start time")
    p.set_defaults(run=schedule)

    p = cmds.add_parser("explain", help="why a cell is (not) on the newest release")
    p.add_argument("cell")
    p.set_defaults(run=explain)

    policy = cmds.add_parser("policy", help="soak times, waves, failure threshold, deadline")
    pcmds = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    p = pcmds.add_parser("show", help="the policy in force")
    p.set_defaults(run=policy_show)
    p = pcmds.add_parser("set", help="replace the policy from a YAML or JSON file")
    p.add_argument(
        "file",
        help="soak_seconds {staging, saas, dedicated}, waves {canary, fractions}, "
        "failure_threshold, progress_deadline_seconds, offline_cells, retry_failed_seconds, "
        "health_checks, stages {STAGE: {bake_seconds, watch_seconds, failure_budget, "
        "inconclusive, max_updating}}, approval_stages",
    )
    p.set_defaults(run=policy_set)
