"""`cell-agent`: the agent that runs inside a cell and connects out to the control plane."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cell-agent",
        description="Runs inside a cell: registers with the control plane over an outbound "
        "connection, heartbeats, and applies what the control plane asks for.",
        epilog="Configured by CELL_ID, CELL_AMQP_URL, CELL_STATE_DIR and the standard AWS_* "
        "variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="connect out, register, heartbeat and reconcile until stopped")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        print("error: the cell agent's run loop is not built yet", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
