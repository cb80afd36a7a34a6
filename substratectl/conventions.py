"""What every substratectl command shares with the tools its users know (kubectl, gh): the
global options accepted anywhere on the line and shown in every command's help, an example in
every command's help, ``--version``, and shell completion (argcomplete: bash, zsh and fish)."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

OUTPUTS = ("table", "wide", "json", "yaml", "name")

EXAMPLES: dict[str, tuple[str, ...]] = {
    "status": ("substratectl status", "substratectl status -o json"),
    "schema": ("substratectl schema", "substratectl schema -o json > contract.json"),
    "topology apply": ("substratectl topology apply",),
    "completion": (
        "substratectl completion bash > /etc/bash_completion.d/substratectl",
        "substratectl completion zsh > ~/.zfunc/_substratectl",
        "substratectl completion fish > ~/.config/fish/completions/substratectl.fish",
    ),
    "cells create": (
        "substratectl cells create acme-prod --stage dedicated --region eu-west-1 --org acme",
    ),
    "cells list": (
        "substratectl cells list",
        "substratectl cells list --stage dedicated --status offline -o wide",
        "substratectl cells list -o name | xargs -n1 substratectl rollout explain",
        "substratectl cells list --watch",
    ),
    "cells show": (
        "substratectl cells show acme-prod",
        "substratectl cells show acme-prod -o yaml",
    ),
    "cells rotate-credentials": (
        "substratectl cells rotate-credentials acme-prod",
        "substratectl cells rotate-credentials acme-prod --rebind",
    ),
    "cells decommission": (
        "substratectl cells decommission acme-old        # asks first on a terminal",
        "substratectl cells decommission acme-old --yes",
    ),
    "cells audit": ("substratectl cells audit acme-prod",),
    "cells pin": ("substratectl cells pin acme-prod 2026.11.2",),
    "cells unpin": ("substratectl cells unpin acme-prod",),
    "release publish": (
        "substratectl release publish release.yaml --dry-run",
        "substratectl release publish release.yaml --at 2h",
    ),
    "release list": ("substratectl release list", "substratectl release list -o name"),
    "release show": ("substratectl release show 2026.12.0",),
    "rollout plan": ("substratectl rollout plan 2026.12.0",),
    "rollout status": (
        "substratectl rollout status",
        "substratectl rollout status 2026.12.0 --watch",
    ),
    "rollout list": ("substratectl rollout list",),
    "rollout watch": ("substratectl rollout watch", "substratectl rollout watch 2026.12.0 --once"),
    "rollout pause": ("substratectl rollout pause 2026.12.0",),
    "rollout resume": ("substratectl rollout resume 2026.12.0",),
    "rollout abort": (
        "substratectl rollout abort 2026.12.0        # asks first on a terminal",
        "substratectl rollout abort 2026.12.0 --yes",
    ),
    "rollout approve": (
        "substratectl rollout approve 2026.12.0",
        "substratectl rollout approve 2026.12.0 --stage dedicated",
    ),
    "rollout promote": ("substratectl rollout promote 2026.12.0 --reason 'fix for INC-42'",),
    "rollout retry": ("substratectl rollout retry 2026.12.0 --failed",),
    "rollout schedule": (
        "substratectl rollout schedule 2026.12.0 --stage dedicated --at 2026-12-08T02:00:00Z",
        "substratectl rollout schedule 2026.12.0 --stage dedicated --cancel",
    ),
    "rollout explain": ("substratectl rollout explain acme-prod",),
    "rollout policy show": ("substratectl rollout policy show -o yaml > policy.yaml",),
    "rollout policy set": ("substratectl rollout policy set policy.yaml",),
    "windows set": ("substratectl windows set --org acme windows.yaml",),
    "windows clear": ("substratectl windows clear --cell acme-prod",),
    "windows list": ("substratectl windows list",),
    "flags set": (
        "substratectl flags set new-editor.yaml",
        "substratectl flags set f.yaml --at 1h",
    ),
    "flags enable": ("substratectl flags enable new-editor",),
    "flags disable": ("substratectl flags disable new-editor        # the kill switch",),
    "flags approve": ("substratectl flags approve new-editor",),
    "flags pending": ("substratectl flags pending",),
    "flags cancel": ("substratectl flags cancel new-editor",),
    "flags list": ("substratectl flags list", "substratectl flags list -o name"),
    "flags show": (
        "substratectl flags show new-editor",
        "substratectl flags show new-editor -o yaml > f.yaml  # edit, then: flags set f.yaml",
    ),
    "flags history": ("substratectl flags history new-editor",),
    "flags delete": ("substratectl flags delete new-editor",),
    "flags eval": ("substratectl flags eval new-editor --cell acme-prod",),
    "flags preview": ("substratectl flags preview new-editor.yaml",),
    "infra publish": ("substratectl infra publish 3 --template cell.yaml --grace 14d",),
    "infra list": ("substratectl infra list",),
    "infra status": ("substratectl infra status", "substratectl infra status --cell acme-prod"),
    "operators add": ("substratectl operators add alice --role operator",),
    "operators list": ("substratectl operators list",),
    "operators set-role": ("substratectl operators set-role alice viewer",),
    "operators remove": ("substratectl operators remove alice",),
    "audit": (
        "substratectl audit --since 24h",
        "substratectl audit --operator op-alice --cell acme-prod -o json",
    ),
}


def seconds(text: str) -> float:
    """``--interval``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not between 0.1 and 3600 seconds")
    return value


def add_watch(parser: argparse.ArgumentParser, default: float = 2.0) -> None:
    parser.add_argument(
        "-w", "--watch", action="store_true", help="show it again every --interval until Ctrl-C"
    )
    parser.add_argument(
        "--interval", type=seconds, default=default,
        help=f"seconds between refreshes (default {default:g})",
    )  # fmt: skip


def add_yes(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-y", "--yes", action="store_true",
        help=f"{what} without asking (needed where there is no terminal to ask on)",
    )  # fmt: skip


def program_version() -> str:
    try:
        return version("substrate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class VersionAction(argparse.Action):
    """``--version``, the installed version looked up only when asked (reading the installed
    packages' metadata would cost every command a few hundred milliseconds)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"substratectl {program_version()}")
        parser.exit()


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, anywhere on the line. On the commands their default is
    SUPPRESS, so one given before the command is not reset by the command's parser."""
    default: Callable[[Any], Any] = (lambda value: value) if top else (lambda _: argparse.SUPPRESS)
    group = parser.add_argument_group("global options")
    group.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default=default("table"),
        help="table (the default), wide (more columns), json, yaml, or name (ids only)",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="the same as -o json"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="log bus activity"
    )


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every runnable command's parser, by its words (``rollout policy set``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from leaves(child, (*path, name))
            return
    yield " ".join(path), parser


def finish(parser: argparse.ArgumentParser) -> None:
    """Global options and examples on every command (the registry of examples is checked
    against the commands by a test)."""
    for words, leaf in leaves(parser):
        add_global_options(leaf, top=False)
        examples = EXAMPLES.get(words, ())
        if examples:
            leaf.formatter_class = argparse.RawDescriptionHelpFormatter
            leaf.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)


# -- completion ------------------------------------------------------------------------------------

SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    from argcomplete.shell_integration import shellcode

    return str(shellcode(["substratectl"], shell=shell))


def _ask(request: Any, pick: Callable[[Any], list[str]]) -> list[str]:
    """Names for completion from the control plane, where it answers within a second; nothing
    (and no error on the terminal) where it does not."""
    from common.bus.rabbit_bus import RabbitBus

    url = os.environ.get("SUBSTRATE_AMQP_URL")
    if not url:
        return []

    async def call() -> list[str]:
        bus = await RabbitBus.connect(url, name="substratectl-completion", give_up_after=1,
                                      fail_fast=True)  # fmt: skip
        try:
            return pick(await bus.call(request, timeout=1))
        finally:
            await bus.close(drain_timeout=0.5)

    try:
        return asyncio.run(asyncio.wait_for(call(), 2))
    except Exception:
        return []


def cell_ids(prefix: str, **_: Any) -> list[str]:
    from common.requests.registry import CellsList

    request = CellsList(limit=1000)
    return [i for i in _ask(request, lambda cells: [c.id for c in cells]) if i.startswith(prefix)]


def versions(prefix: str, **_: Any) -> list[str]:
    from common.requests.rollout import ReleaseList

    found = _ask(ReleaseList(), lambda records: [str(r.version) for r in records])
    return [v for v in found if v.startswith(prefix)]


def complete_names(parser: argparse.ArgumentParser) -> None:
    """Cell ids and release versions complete from the control plane (cheap: one page)."""
    for words, leaf in leaves(parser):
        if words.startswith("infra"):
            continue  # template versions are numbers of their own
        for action in leaf._actions:
            if action.dest in ("id", "cell"):
                action.completer = cell_ids  # type: ignore[attr-defined]
            elif action.dest == "version" and not action.option_strings:
                action.completer = versions  # type: ignore[attr-defined]
