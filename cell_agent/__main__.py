"""`cell-agent`: the agent that runs inside a cell and connects out to the control plane."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from contextlib import suppress

from cell_agent.agent import AGENT_VERSION, Agent
from cell_agent.aws import CellAws
from cell_agent.flags import LocalFlags
from cell_agent.journal import Journal
from cell_agent.settings import AgentSettings
from cell_agent.state import StateStore, dump
from common.runner import configure_logging, run, wait_for_signal
from common.settings import load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cell-agent",
        description="Runs inside a cell: registers with the control plane over an outbound "
        "connection, heartbeats, and applies what the control plane asks for.",
        epilog="Configured by CELL_ID, CELL_AMQP_URL, CELL_STATE_DIR, CELL_HEARTBEAT_SECONDS, "
        "CELL_SYNC_SECONDS, CELL_STACK_NAME, CELL_METRICS_PORT and the standard AWS_* "
        "variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="connect out, register, heartbeat and reconcile until stopped")
    sub.add_parser("state", help="print what the agent keeps in CELL_STATE_DIR (no secrets)")
    flags = sub.add_parser("flags", help="the flags snapshot this cell holds")
    flags_sub = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    p = flags_sub.add_parser(
        "eval", help="evaluate a flag from the local snapshot (the same JSON as the service's)"
    )
    p.add_argument("key")
    p.add_argument("--default", help="JSON value answered if the flag is not in the snapshot")
    return parser


def flags_eval(settings: AgentSettings, key: str, default: str | None) -> int:
    """Works with the control plane unreachable: it reads only CELL_STATE_DIR."""
    try:
        fallback = json.loads(default) if default is not None else None
    except ValueError:
        print(f"error: --default: not JSON: {default}", file=sys.stderr)
        return 2
    applied = Journal(settings.state_dir).applied

    def own() -> dict[str, str | None]:
        return {
            "id": settings.id,
            "installed_release": applied.release.version if applied.release else None,
            "agent_version": AGENT_VERSION,
        }

    answer = LocalFlags(settings.state_dir, own).evaluate(key, fallback)
    print(json.dumps(answer.as_json(), sort_keys=True))
    return 0


async def _run(settings: AgentSettings) -> None:
    agent = Agent(settings, StateStore(settings.state_dir), CellAws(settings.aws_region))
    stop = asyncio.Event()
    waiter = asyncio.create_task(wait_for_signal(stop))
    try:
        await agent.run(stop)
    finally:
        waiter.cancel()
        with suppress(asyncio.CancelledError):
            await waiter


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = load(AgentSettings)
    if args.command == "state":
        print(dump(StateStore(settings.state_dir).state))
        return
    if args.command == "flags":
        sys.exit(flags_eval(settings, args.key, args.default))
    configure_logging(settings.log_level)
    try:
        run(_run(settings))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
