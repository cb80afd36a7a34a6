"""`substratectl audit`: who asked for what, when, and what came of it. Every service keeps its
own audit log (common/audit.py); this asks them all and merges the answers by time."""

from __future__ import annotations

import argparse
import asyncio
import sys

from common import times, topology
from common.bus.errors import BusError
from common.requests.audit import AuditList, AuditRecord
from substratectl.context import Ctl
from substratectl.output import table

COLUMNS = ["at", "operator", "role", "service", "method", "target", "result", "detail"]


async def audit(ctl: Ctl) -> int:
    a = ctl.args
    ask = AuditList(since=a.since, operator=a.operator, target=a.cell or a.target, limit=a.limit)
    await ctl.bus()  # no broker is one error, not one per service

    async def one(service: str) -> list[AuditRecord] | str:
        try:
            return await ctl.call(ask, service=service)
        except BusError as exc:
            return f"{service}: {exc}"

    services = [a.service] if a.service else topology.SERVICES
    answers = await asyncio.gather(*(one(s) for s in services))
    missing = [a for a in answers if isinstance(a, str)]
    entries = sorted((e for a in answers if not isinstance(a, str) for e in a), key=lambda e: e.at)[
        -ask.limit :
    ]
    ctl.show({"entries": entries, "missing": missing}, lambda _: table(entries, COLUMNS))
    for problem in missing:
        # The log is incomplete without that service's part: say so, and fail.
        print(f"substratectl: audit is missing a service's entries: {problem}", file=sys.stderr)
    return 1 if missing else 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="who asked for what, when, and the result (every service)")
    p.add_argument("--since", type=times.ago, help="a time (ISO 8601) or a duration ago: 90m, 7d")
    p.add_argument("--operator", help="only this operator's requests (the broker user)")
    p.add_argument("--cell", help="only requests about this cell")
    p.add_argument("--target", help="only requests about this release version, flag or operator")
    p.add_argument("--service", choices=topology.SERVICES, help="only this service's log")
    p.add_argument("--limit", type=int, default=200, help="the newest N entries (default 200)")
    p.set_defaults(run=audit)
