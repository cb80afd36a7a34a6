"""`substratectl release ...`: publish a release file, list and show releases."""

from __future__ import annotations

import argparse
from pathlib import Path

from common import times
from common.requests.rollout import (
    ReleaseList,
    ReleasePublish,
    ReleaseRecord,
    ReleaseShow,
    RolloutPlan,
)
from substratectl.context import Ctl, read_mapping_file
from substratectl.output import fields, moment, plural, table
from substratectl.rollouts import plan_text


def _record(record: ReleaseRecord) -> str:
    lines = [fields(record.model_dump(mode="json", exclude={"release"}))]
    if record.release.notes:
        lines.append(f"notes: {record.release.notes}")
    columns = ["name", "image", "digest", "requires_maintenance"]
    lines += ["", table(record.release.components, columns)]
    return "\n".join(lines)


async def publish(ctl: Ctl) -> int:
    release = read_mapping_file(Path(ctl.args.file), "a mapping with version and components")
    if ctl.args.dry_run:
        # The file checked and its plan shown; nothing is published. Exit 1 if publishing it
        # would be refused (the reason is printed).
        preview = await ctl.call(
            RolloutPlan.model_validate({"version": str(release.get("version")), "release": release})
        )
        ctl.show(preview, plan_text)
        return 1 if preview.refused else 0
    at = ctl.args.at
    starts = f"; its rollout starts at {moment(at)}" if at else ""
    return await ctl.ask(
        ReleasePublish.model_validate({"release": release, "starts_at": at}),
        lambda r: f"published release {r.version} ({plural(r.components, 'component')}){starts}",
    )


async def list_releases(ctl: Ctl) -> int:
    columns = ["version", "components", "requires_maintenance", "reversible", "published_at"]
    return await ctl.ask(ReleaseList(), lambda records: table(records, columns))


async def show(ctl: Ctl) -> int:
    return await ctl.ask(ReleaseShow(version=ctl.args.version), _record)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    release = sub.add_parser("release", help="publish and inspect releases")
    cmds = release.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    p = cmds.add_parser("publish", help="publish a release file (YAML or JSON), once per version")
    p.add_argument(
        "file",
        help="version, components (name, image, digest, requires_maintenance), reversible, "
        "required, health {checks, bake_seconds, watch_seconds, interval_seconds}, notes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and show which cells it would reach, each cell's upgrade path and "
        "its health checks, without publishing (exit 1 if publishing would be refused)",
    )
    p.add_argument(
        "--at",
        type=times.at,
        help="start its rollout no earlier than this: a time (ISO 8601) or from now (30m, 2h)",
    )
    p.set_defaults(run=publish)
    p = cmds.add_parser("list", help="published releases, newest first")
    p.set_defaults(run=list_releases)
    p = cmds.add_parser("show", help="one release and its components")
    p.add_argument("version")
    p.set_defaults(run=show)
