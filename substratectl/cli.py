"""substratectl: the operator CLI. Every command talks request/reply to a service over the
bus, prints a table (or ``--json``), and exits non-zero with a one-line reason on error. This
module only assembles the command modules and runs one."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
import time

import argcomplete
from pydantic import ValidationError

from common.bus.errors import BusError, RemoteError, validation_summary
from common.settings import ControlPlaneSettings, load
from substratectl.context import Ctl, FileProblem, NotConfirmed
from substratectl.conventions import (
    SHELLS,
    VersionAction,
    add_global_options,
    complete_names,
    completion_script,
    finish,
)
from substratectl.output import fail, on_terminal

# The module each command word is in, in the order help lists them. A command runs with its own
# module only: the others' request types took a good part of every command's start. Help,
# completion and a mistyped command build them all.
MODULE_OF = {
    "schema": "control_plane", "status": "control_plane", "topology": "control_plane",
    "cells": "cells", "release": "releases", "rollout": "rollouts", "windows": "windows",
    "flags": "flags", "infra": "infra", "operators": "operators", "audit": "audit",
}  # fmt: skip
MODULES = tuple(dict.fromkeys(MODULE_OF.values()))
_VALUED = ("-o", "--output")  # the global options that take the next word as their value


def command_word(argv: list[str]) -> str | None:
    """The command a line runs (its first word that is neither an option nor an option's
    value), or None where the line has none."""
    words = iter(argv)
    for word in words:
        if word in _VALUED:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``command`` (a command word), that command's module only."""
    modules = (MODULE_OF[command],) if command in MODULE_OF else MODULES
    parser = argparse.ArgumentParser(
        prog="substratectl",
        description="Operate the Substrate control plane: cells, releases, rollouts, flags.",
        epilog="The broker URL comes from SUBSTRATE_AMQP_URL. Exit codes: 0 done, 1 refused or "
        "failed (one line on stderr), 2 a usage error or a missing setting, 130 interrupted.",
    )
    parser.add_argument("--version", action=VersionAction)
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(offline=False)
    for name in modules:
        importlib.import_module(f"substratectl.{name}").add_commands(sub)
    p = sub.add_parser("completion", help="the shell completion script: bash, zsh or fish")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(run=completion, offline=True)
    finish(parser)
    complete_names(parser)
    return parser


async def completion(ctl: Ctl) -> int:
    print(completion_script(ctl.args.shell), end="")
    return 0


async def run_command(args: argparse.Namespace, settings: ControlPlaneSettings | None) -> int:
    ctl = Ctl(args, settings)
    try:
        if getattr(args, "watch", False):
            return await watched(ctl)
        code: int = await args.run(ctl)
        return code
    except NotConfirmed as exc:
        return fail(str(exc), as_json=ctl.as_json, code=exc.code)
    except RemoteError as exc:
        return fail(f"{exc.service}: {exc.message}", as_json=ctl.as_json)
    except ValidationError as exc:
        # A request the command built from its arguments or a file: the field and the problem.
        return fail(validation_summary(exc), as_json=ctl.as_json)
    except (FileProblem, BusError) as exc:
        return fail(str(exc), as_json=ctl.as_json)
    finally:
        await ctl.close()


async def watched(ctl: Ctl) -> int:
    """``--watch``: the command again every --interval until Ctrl-C; on a terminal each time on
    a cleared screen, elsewhere one after another."""
    while True:
        if on_terminal():
            print("\x1b[H\x1b[2J", end="")
        print(f"every {ctl.args.interval:g}s: {time.strftime('%H:%M:%S')}", file=sys.stderr)
        await ctl.args.run(ctl)
        sys.stdout.flush()
        await asyncio.sleep(ctl.args.interval)


# Exit codes (docs/operating.md, "substratectl"): 0 done; 1 refused or failed (the reason on
# stderr, and as {"error": ...} with --json; also a service down for `status`, a rollout that
# ended halted for `rollout watch`); 2 a usage error or a missing setting; 130 interrupted; 141
# the reader of the output went away (`| head`), quietly, as a shell's own tools do.
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    completing = "_ARGCOMPLETE" in os.environ
    parser = build_parser(None if completing else command_word(argv))
    # Answers the shell's completion requests (and exits) when the shell asks; nothing else.
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.json:
        args.output = "json"
    args.json = args.output == "json"
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
