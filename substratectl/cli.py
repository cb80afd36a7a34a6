"""substratectl: the operator CLI. Every command talks request/reply to a service over the
bus, prints a table (or ``--json``), and exits non-zero with a one-line reason on error."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from common import topology
from common.bus import BusError, RabbitBus, RemoteError
from common.messages import MESSAGES, json_schema
from common.settings import ControlPlaneSettings, load
from substratectl import cells, flags, releases, rollouts
from substratectl.output import emit_json, fail, table

Command = Callable[[argparse.Namespace], Awaitable[int]]


class Ctl:
    """What a command needs: the parsed arguments, the output mode and, lazily, the bus."""

    def __init__(self, args: argparse.Namespace, settings: ControlPlaneSettings | None) -> None:
        self.args = args
        self.as_json: bool = args.json
        self._settings = settings
        self._bus: RabbitBus | None = None
        self._connecting = asyncio.Lock()

    @property
    def settings(self) -> ControlPlaneSettings:
        assert self._settings is not None, "this command was declared offline"
        return self._settings

    async def bus(self) -> RabbitBus:
        async with self._connecting:
            if self._bus is None:
                self._bus = await RabbitBus.connect(
                    self.settings.amqp_url,
                    name="substratectl",
                    publish_timeout=self.settings.publish_timeout_seconds,
                    give_up_after=self.settings.rpc_timeout_seconds,
                )
        return self._bus

    async def call(self, service: str, method: str, params: dict[str, Any] | None = None) -> Any:
        bus = await self.bus()
        return await bus.request(
            service, method, params or {}, timeout=self.settings.rpc_timeout_seconds
        )

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close(drain_timeout=1)


async def cmd_schema(ctl: Ctl) -> int:
    if ctl.as_json:
        emit_json(json_schema())
    else:
        rows = [
            {"type": name, "exchange": cls.exchange or "(reply)", "model": cls.__name__}
            for name, cls in sorted(MESSAGES.items())
        ]
        print(table(rows, ["type", "exchange", "model"]))
        print("\n`substratectl --json schema` prints the JSON Schema of every message.")
    return 0


async def cmd_status(ctl: Ctl) -> int:
    async def one(service: str) -> dict[str, Any]:
        try:
            result = await ctl.call(service, "status")
            return {"service": service, "up": True, "detail": result}
        except BusError as exc:
            return {"service": service, "up": False, "detail": str(exc)}

    rows = await asyncio.gather(*(one(s) for s in topology.SERVICES))
    if ctl.as_json:
        emit_json(list(rows))
    else:
        print(table([_status_row(r) for r in rows], ["service", "up", "detail"]))
    return 0 if all(r["up"] for r in rows) else 1


def _status_row(row: dict[str, Any]) -> dict[str, Any]:
    """One readable line of a service's status: ``ready, cells: 3 online, releases: 2``."""
    detail = row["detail"]
    if isinstance(detail, dict):
        parts = ["ready" if detail.get("ready") else "not ready"]
        for key, value in detail.items():
            if key in ("service", "ready"):
                continue
            if isinstance(value, list):
                parts.append(f"{key}: {', '.join(map(str, value)) or 'none'}")
            elif isinstance(value, dict):
                counts = ", ".join(f"{n} {k}" for k, n in value.items() if n)
                parts.append(f"{key}: {counts or 'none'}")
            else:
                parts.append(f"{key}: {value}")
        detail = ", ".join(parts)
    return {**row, "detail": detail}


async def cmd_topology_apply(ctl: Ctl) -> int:
    bus = await ctl.bus()
    plane = topology.control_plane()
    await bus.declare(plane)
    summary = {"exchanges": len(plane.exchanges), "queues": len(plane.queues)}
    if ctl.as_json:
        emit_json(summary)
    else:
        print(f"declared {summary['exchanges']} exchanges and {summary['queues']} queues")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="substratectl",
        description="Operate the Substrate control plane: cells, releases, rollouts, flags.",
        epilog="The broker URL comes from SUBSTRATE_AMQP_URL.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("-v", "--verbose", action="store_true", help="log bus activity")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(offline=False)

    schema = sub.add_parser("schema", help="print the wire contract (JSON Schema with --json)")
    schema.set_defaults(run=cmd_schema, offline=True)

    status = sub.add_parser("status", help="ask every service whether it is up")
    status.set_defaults(run=cmd_status)

    cells.add_commands(sub)
    releases.add_commands(sub)
    rollouts.add_commands(sub)
    flags.add_commands(sub)

    topo = sub.add_parser("topology", help="the broker objects of the control plane")
    topo_sub = topo.add_subparsers(dest="topology_command", required=True, metavar="ACTION")
    apply = topo_sub.add_parser("apply", help="declare exchanges and service queues (idempotent)")
    apply.set_defaults(run=cmd_topology_apply)
    return parser


async def run_command(args: argparse.Namespace, settings: ControlPlaneSettings | None) -> int:
    ctl = Ctl(args, settings)
    try:
        code: int = await args.run(ctl)
        return code
    except RemoteError as exc:
        return fail(f"{exc.service}: {exc.message}", as_json=ctl.as_json)
    except releases.FileProblem as exc:
        return fail(str(exc), as_json=ctl.as_json)
    except BusError as exc:
        return fail(str(exc), as_json=ctl.as_json)
    finally:
        await ctl.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    # Settings are read before the event loop starts so a missing variable is one clean line.
    settings = None if args.offline else load(ControlPlaneSettings)
    try:
        return asyncio.run(run_command(args, settings))
    except KeyboardInterrupt:
        return 130
