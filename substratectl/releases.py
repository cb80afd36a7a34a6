"""`substratectl release ...`: publish a release file, list and show releases."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from substratectl.output import emit_json, fields, table

if TYPE_CHECKING:
    from substratectl.cli import Ctl


class FileProblem(Exception):
    """A release file that cannot be read or parsed; the message names the file."""


def read_mapping_file(path: Path, expected: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {exc.strerror}") from None
    try:
        # BaseLoader keeps every scalar as written: YAML would otherwise read 2026.11 as a
        # float; pydantic still turns "true" into a bool. JSON is YAML too.
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FileProblem(f"{path} is not valid YAML or JSON{where}") from None
    if not isinstance(data, dict):
        raise FileProblem(f"{path}: expected {expected}")
    return data


def _show(ctl: Ctl, record: dict[str, Any]) -> None:
    if ctl.as_json:
        emit_json(record)
        return
    print(fields({k: v for k, v in record.items() if k != "release"}))
    if record["release"].get("notes"):
        print(f"notes: {record['release']['notes']}")
    print()
    print(
        table(record["release"]["components"], ["name", "image", "digest", "requires_maintenance"])
    )


async def publish(ctl: Ctl) -> int:
    release = read_mapping_file(Path(ctl.args.file), "a mapping with version and components")
    record = await ctl.call("rollout", "release.publish", {"release": release})
    if ctl.as_json:
        emit_json(record)
    else:
        print(f"published release {record['version']} ({record['components']} components)")
    return 0


async def list_releases(ctl: Ctl) -> int:
    records = await ctl.call("rollout", "release.list")
    if ctl.as_json:
        emit_json(records)
    else:
        columns = ["version", "components", "requires_maintenance", "reversible", "published_at"]
        print(table(records, columns))
    return 0


async def show(ctl: Ctl) -> int:
    _show(ctl, await ctl.call("rollout", "release.show", {"version": ctl.args.version}))
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
