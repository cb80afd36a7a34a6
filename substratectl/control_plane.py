"""`substratectl status|schema|topology`: the control plane itself."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

# Messages kept beside their parts register their wire names when imported; the contract
# printed here holds them too.
from common import deferrals, operators, topology
from common.bus.errors import BusError
from common.messages import MESSAGES
from common.messages import json_schema as message_schema
from common.requests import REQUESTS, ServiceStatus, Status
from common.requests import json_schema as request_schema
from substratectl.context import Ctl
from substratectl.output import emit_json, table

_BESIDE = (deferrals.DeferralDecided, operators.OperatorsRoster)


async def schema(ctl: Ctl) -> int:
    if ctl.as_json:
        emit_json({**message_schema(), "requests": request_schema()})
        return 0
    rows = [
        {"type": name, "exchange": cls.exchange or "(reply)", "model": cls.__name__}
        for name, cls in sorted(MESSAGES.items())
    ]
    print(table(rows, ["type", "exchange", "model"]))
    methods = [
        {
            "service": service or "(every)",
            "method": method,
            "request": cls.__name__,
            "response": cls.response_name(),
        }
        for (service, method), cls in sorted(REQUESTS.items())
    ]
    print()
    print(table(methods, ["service", "method", "request", "response"]))
    print("\n`substratectl --json schema` prints the JSON Schema of every message and request.")
    return 0


@dataclass(frozen=True)
class ServiceRow:
    service: str
    up: bool
    detail: ServiceStatus | str


def status_line(row: ServiceRow) -> str:
    """One readable line of a service's status: ``ready, cells: 3 online, releases: 2``."""
    detail = row.detail
    if isinstance(detail, str):
        return detail
    parts = ["ready" if detail.ready else "not ready"]
    for key, value in detail.model_dump().items():
        if key in ("service", "ready"):
            continue
        if isinstance(value, list):
            parts.append(f"{key}: {', '.join(map(str, value)) or 'none'}")
        elif isinstance(value, dict):
            counts = ", ".join(f"{n} {k}" for k, n in value.items() if n)
            parts.append(f"{key}: {counts or 'none'}")
        else:
            parts.append(f"{key}: {'none' if value is None else value}")
    return ", ".join(parts)


async def status(ctl: Ctl) -> int:
    # No broker is one error for the command, not one per service.
    await ctl.bus()

    async def one(service: str) -> ServiceRow:
        try:
            answer = await ctl.call(Status(), service=service)
            return ServiceRow(service, True, answer)
        except BusError as exc:
            return ServiceRow(service, False, str(exc))

    rows = await asyncio.gather(*(one(s) for s in topology.SERVICES))
    answer = [{"service": r.service, "up": r.up, "detail": r.detail} for r in rows]
    shown = [{"service": r.service, "up": r.up, "detail": status_line(r)} for r in rows]
    ctl.show(answer, lambda _: table(shown, ["service", "up", "detail"]))
    return 0 if all(r.up for r in rows) else 1


async def topology_apply(ctl: Ctl) -> int:
    bus = await ctl.bus()
    plane = topology.control_plane()
    await bus.declare(plane)
    summary = {"exchanges": len(plane.exchanges), "queues": len(plane.queues)}
    ctl.show(summary, lambda s: f"declared {s['exchanges']} exchanges and {s['queues']} queues")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("schema", help="print the wire contract (JSON Schema with --json)")
    p.set_defaults(run=schema, offline=True)

    p = sub.add_parser("status", help="ask every service whether it is up")
    p.set_defaults(run=status)

    topo = sub.add_parser("topology", help="the broker objects of the control plane")
    topo_sub = topo.add_subparsers(dest="topology_command", required=True, metavar="ACTION")
    p = topo_sub.add_parser("apply", help="declare exchanges and service queues (idempotent)")
    p.set_defaults(run=topology_apply)
