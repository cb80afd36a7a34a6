"""`substratectl release ...`: publish a release file, list and show releases."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.requests.rollout import ReleaseList, ReleasePublish, ReleaseRecord, ReleaseShow
from substratectl.context import Ctl, read_mapping_file
from substratectl.output import emit_json, fields, table


def _show(ctl: Ctl, record: ReleaseRecord) -> None:
    if ctl.as_json:
        emit_json(record)
        return
    print(fields(record.model_dump(mode="json", exclude={"release"})))
    if record.release.notes:
        print(f"notes: {record.release.notes}")
    print()
    print(table(record.release.components,
                ["name", "image", "digest", "requires_maintenance"]))  # fmt: skip


async def publish(ctl: Ctl) -> int:
    release = read_mapping_file(Path(ctl.args.file), "a mapping with version and components")
    record = await ctl.call(ReleasePublish.model_validate({"release": release}))
    if ctl.as_json:
        emit_json(record)
    else:
        print(f"published release {record.version} ({record.components} components)")
    return 0


async def list_releases(ctl: Ctl) -> int:
    records = await ctl.call(ReleaseList())
    if ctl.as_json:
        emit_json(records)
    else:
        columns = ["version", "components", "requires_maintenance", "reversible", "published_at"]
        print(table(records, columns))
    return 0


async def show(ctl: Ctl) -> int:
    _show(ctl, await ctl.call(ReleaseShow(version=ctl.args.version)))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    release = sub.add_parser("release", help="publish and inspect releases")
    cmds = release.add_subparsers(dest="release_command", required=True, metavar="ACTION")
    p = cmds.add_parser("publish", help="publish a release file (YAML or JSON), once per version")
    p.add_argument("file", help="version, components (name, image, digest, requires_maintenance), "
                   "reversible, notes")  # fmt: skip
    p.set_defaults(run=publish)
    p = cmds.add_parser("list", help="published releases, newest first")
    p.set_defaults(run=list_releases)
    p = cmds.add_parser("show", help="one release and its components")
    p.add_argument("version")
    p.set_defaults(run=show)
