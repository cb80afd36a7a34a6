"""`cell-agent`: the agent that runs inside a cell and connects out to the control plane."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from cell_agent import customer
from cell_agent.agent import AGENT_VERSION, Agent
from cell_agent.aws import CellAws
from cell_agent.deferral import DeferralFile
from cell_agent.flags import LocalFlags
from cell_agent.journal import Journal
from cell_agent.settings import AgentSettings
from cell_agent.state import StateStore
from cell_agent.status import describe
from common import times
from common.runner import configure_logging, run, wait_for_signal
from common.settings import load


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cell-agent",
        description="Runs inside a cell: registers with the control plane over an outbound "
        "connection, heartbeats, and applies what the control plane asks for.",
        epilog="Configured by CELL_ID, CELL_AMQP_URL, CELL_STATE_DIR, CELL_HEARTBEAT_SECONDS, "
        "CELL_SYNC_SECONDS, CELL_STACK_NAME, CELL_METRICS_PORT and the standard AWS_* "
        "variables (see docs/agent.md).",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (infra, debug-access)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="connect out, register, heartbeat and reconcile until stopped")
    sub.add_parser(
        "state",
        help="what the agent keeps in CELL_STATE_DIR (no secrets): the installed release, the "
        "last upgrade's outcome and verdict, the flags snapshot, whether it is connected",
    )
    flags = sub.add_parser("flags", help="the flags snapshot this cell holds")
    flags_sub = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    p = flags_sub.add_parser(
        "eval", help="evaluate a flag from the local snapshot (the same JSON as the service's)"
    )
    p.add_argument("key")
    p.add_argument("--default", help="JSON value answered if the flag is not in the snapshot")

    infra = sub.add_parser("infra", help="this cell's mandatory infrastructure update")
    infra_sub = infra.add_subparsers(dest="infra_command", required=True, metavar="ACTION")
    infra_sub.add_parser("status", help="the template version required, by when, and where")
    infra_sub.add_parser(
        "preview", help="a change set of the required template on the stack (not executed)"
    )
    infra_sub.add_parser("apply", help="update the stack to the required template and wait")

    debug = sub.add_parser("debug-access", help="emergency read-only access for vendor support")
    debug_sub = debug.add_subparsers(dest="debug_command", required=True, metavar="ACTION")
    p = debug_sub.add_parser("grant", help="open access for N hours (capped), with a reason")
    p.add_argument("--hours", type=float, required=True)
    p.add_argument("--reason", required=True, help="kept in the control plane's audit trail")
    p.add_argument("--by", help="who grants it (default: your AWS identity)")
    debug_sub.add_parser("list", help="open debug access and when each expires")
    p = debug_sub.add_parser("revoke", help="close debug access now (all, or one role)")
    p.add_argument("role", nargs="?", help="the role's name (default: every open one)")

    p = sub.add_parser(
        "defer", help="ask the control plane not to update this cell before a time (or cancel)"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--until", type=times.at, help="a time (ISO 8601) or from now: 36h, 3d")
    when.add_argument("--cancel", action="store_true", help="updates may resume at once")
    p.add_argument("--reason", default="", help="kept in both sides' audit trails")
    p.add_argument("--by", default=getpass.getuser(), help="who asks (default: your login)")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the answer")
    return parser


def defer(state_dir: str | None, args: argparse.Namespace) -> int:
    """Kept for the running agent to send; waits for the control plane's answer. Exit 0
    accepted, 1 refused (the reason on stderr), 3 no answer yet (the agent sends it when it
    can; cell-agent state shows the answer once it comes)."""
    if not state_dir or not Path(state_dir).is_dir():
        print("error: CELL_STATE_DIR: not set or not a directory", file=sys.stderr)
        return 2
    if args.until is not None and not args.reason:
        print("error: --reason: say why (it is kept in both audit trails)", file=sys.stderr)
        return 2
    file = DeferralFile(Path(state_dir))
    request_id = file.request(None if args.cancel else args.until, args.reason, args.by)
    answer = file.wait(request_id, args.wait)
    if args.json:
        print(json.dumps({"request_id": request_id, "answer": answer}, indent=2))
    if answer is None:
        print(
            f"sent deferral request {request_id}; no answer within {args.wait:g}s (is the agent"
            " running and connected?); cell-agent state shows the answer once it comes",
            file=sys.stderr,
        )
        return 3
    if not answer["accepted"]:
        print(f"error: refused: {answer['reason']}", file=sys.stderr)
        return 1
    if not args.json:
        print(answer["reason"])
    return 0


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


def _customer_command(args: argparse.Namespace, settings: AgentSettings) -> Callable[[], None]:
    as_json: bool = args.json
    if args.command == "infra":
        chosen = {
            "status": customer.infra_status,
            "preview": customer.infra_preview,
            "apply": customer.infra_apply,
        }[args.infra_command]
        return lambda: chosen(settings, as_json)
    if args.debug_command == "grant":
        return lambda: customer.debug_grant(settings, args.hours, args.reason, args.by, as_json)
    if args.debug_command == "list":
        return lambda: customer.debug_list(settings, as_json)
    return lambda: customer.debug_revoke(settings, args.role, as_json)


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


def state(state_dir: str | None) -> int:
    """Reads CELL_STATE_DIR alone: it works without the broker URL or the control plane."""
    if not state_dir:
        print("error: CELL_STATE_DIR: not set (the agent's state directory)", file=sys.stderr)
        return 2
    if not Path(state_dir).is_dir():
        print(f"error: CELL_STATE_DIR: {state_dir} is not a directory", file=sys.stderr)
        return 2
    print(json.dumps(describe(Path(state_dir)), indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "state":
        sys.exit(state(os.environ.get("CELL_STATE_DIR")))
    if args.command == "defer":
        sys.exit(defer(os.environ.get("CELL_STATE_DIR"), args))
    settings = load(AgentSettings)
    if args.command == "flags":
        sys.exit(flags_eval(settings, args.key, args.default))
    if args.command in ("infra", "debug-access"):
        sys.exit(customer.run(settings, _customer_command(args, settings)))
    configure_logging(settings.log_level)
    try:
        run(_run(settings))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
