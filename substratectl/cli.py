"""substratectl: the operator CLI. Every command talks request/reply to a service over the
bus, prints a table (or ``--json``), and exits non-zero with a one-line reason on error. This
module only assembles the command modules and runs one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pydantic import ValidationError

from common.bus.errors import BusError, RemoteError, validation_summary
from common.settings import ControlPlaneSettings, load
from substratectl import (
    audit,
    cells,
    control_plane,
    flags,
    infra,
    operators,
    releases,
    rollouts,
    windows,
)
from substratectl.context import Ctl, FileProblem
from substratectl.output import fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="substratectl",
        description="Operate the Substrate control plane: cells, releases, rollouts, flags.",
        epilog="The broker URL comes from SUBSTRATE_AMQP_URL.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="table (the default), json (the same as --json) or yaml",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log bus activity")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(offline=False)
    for module in (
        control_plane,
        cells,
        releases,
        rollouts,
        windows,
        flags,
        infra,
        operators,
        audit,
    ):
        module.add_commands(sub)
    return parser


async def run_command(args: argparse.Namespace, settings: ControlPlaneSettings | None) -> int:
    ctl = Ctl(args, settings)
    try:
        code: int = await args.run(ctl)
        return code
    except RemoteError as exc:
        return fail(f"{exc.service}: {exc.message}", as_json=ctl.as_json)
    except ValidationError as exc:
        # A request the command built from its arguments or a file: the field and the problem.
        return fail(validation_summary(exc), as_json=ctl.as_json)
    except (FileProblem, BusError) as exc:
        return fail(str(exc), as_json=ctl.as_json)
    finally:
        await ctl.close()


# Exit codes (docs/operating.md, "substratectl"): 0 done; 1 refused or failed (the reason on
# stderr, and as {"error": ...} with --json; also a service down for `status`, a rollout that
# ended halted for `rollout watch`); 2 a usage error or a missing setting; 130 interrupted; 141
# the reader of the output went away (`| head`), quietly, as a shell's own tools do.
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141


def output_options_first(argv: list[str]) -> list[str]:
    """The output options (``-o FORMAT``, ``--output FORMAT``, ``--json``) where people type
    them, after the command too (``flags show KEY -o yaml``), moved before it for argparse."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg in ("-o", "--output") and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
            continue
        if arg == "--json" or (arg.startswith(("--output=", "-o")) and arg != "-o"):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(output_options_first(sys.argv[1:] if argv is None else argv))
    args.json = args.json or args.output == "json"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    # Settings are read before the event loop starts so a missing variable is one clean line.
    settings = None if args.offline else load(ControlPlaneSettings)
    try:
        code = asyncio.run(run_command(args, settings))
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Nothing more can be written; point stdout at nothing so the interpreter's last
        # flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
