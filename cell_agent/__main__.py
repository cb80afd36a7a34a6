"""`cell-agent`: the agent that runs inside a cell and connects out to the control plane."""

from __future__ import annotations

import argparse
import asyncio
import sys
from contextlib import suppress

from cell_agent.agent import Agent
from cell_agent.aws import CellAws
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
    return parser


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
    configure_logging(settings.log_level)
    try:
        run(_run(settings))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
