"""What every command shares: the parsed arguments, the output mode, a typed client for the
services, and reading the files operators hand in. Command modules import this; ``cli.py``
assembles them."""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from common.bus.errors import BusError
from common.bus.rabbit_bus import RabbitBus
from common.requests import Request
from common.settings import ControlPlaneSettings
from substratectl.output import STYLE, emit_json, emit_yaml, names

if TYPE_CHECKING:
    import yaml

R = TypeVar("R")
# How long a command waits for the broker before saying it cannot reach it: a broker that is
# restarting gets a few quick retries; one that is down is reported well within 4 s.
CONNECT_SECONDS = 1.5


class FileProblem(Exception):
    """A file that cannot be read or parsed; the message names the file."""


class NotConfirmed(Exception):
    """An irreversible command nobody confirmed: declined at the prompt (exit 1), or no
    terminal to ask on and no --yes (exit 2, a usage error)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Ctl:
    """What a command needs: the parsed arguments, the output mode and, lazily, the bus."""

    def __init__(self, args: argparse.Namespace, settings: ControlPlaneSettings | None) -> None:
        self.args = args
        self.output: str = getattr(args, "output", "table")
        self.as_json: bool = self.output == "json"
        self.as_yaml: bool = self.output == "yaml"
        STYLE.wide = self.output == "wide"
        self._settings = settings
        self._bus: RabbitBus | None = None
        self._unreachable: BusError | None = None
        self._connecting = asyncio.Lock()

    @property
    def settings(self) -> ControlPlaneSettings:
        assert self._settings is not None, "this command was declared offline"
        return self._settings

    async def bus(self) -> RabbitBus:
        """The connection, made once; a broker that cannot be reached is one error, said once
        (every later call in the command gets the same one at once)."""
        async with self._connecting:
            if self._unreachable is not None:
                raise self._unreachable
            if self._bus is None:
                try:
                    self._bus = await RabbitBus.connect(
                        self.settings.amqp_url,
                        name="substratectl",
                        publish_timeout=self.settings.publish_timeout_seconds,
                        give_up_after=min(CONNECT_SECONDS, self.settings.rpc_timeout_seconds),
                        fail_fast=True,
                    )
                except BusError as exc:
                    self._unreachable = exc
                    raise
        return self._bus

    async def call(self, request: Request[R], *, service: str | None = None) -> R:
        """Send ``request`` to its service and return its typed response."""
        bus = await self.bus()
        return await bus.call(request, service=service, timeout=self.settings.rpc_timeout_seconds)

    async def ask(self, request: Request[R], as_text: Callable[[R], str]) -> int:
        """What most commands are: send ``request`` and print its answer (exit code 0). A
        refusal or a failure raises, and the CLI prints it as one line."""
        self.show(await self.call(request), as_text)
        return 0

    def show(self, answer: R, as_text: Callable[[R], str]) -> None:
        """An answer as one JSON document with --json, YAML with -o yaml, its names with -o
        name, else as ``as_text`` puts it for people."""
        if self.output == "name":
            for name in names(answer):
                print(name)
        elif self.as_yaml:
            emit_yaml(answer)
        elif self.as_json:
            emit_json(answer)
        else:
            print(as_text(answer))

    def confirm(self, question: str) -> None:
        """Go on only with --yes, or a yes typed at the terminal."""
        if getattr(self.args, "yes", False):
            return
        if not sys.stdin.isatty():
            raise NotConfirmed(f"{question}: pass --yes to confirm (no terminal to ask on)", 2)
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            raise NotConfirmed("not confirmed; nothing was done", 1)

    async def close(self) -> None:
        if self._bus is not None:
            await self._bus.close(drain_timeout=1)


# Releases, policies and flags are a few kilobytes; a bigger file is a mistake (or an attack on
# whoever runs the command), refused before parsing.
MAX_FILE_BYTES = 1024 * 1024


def _parse(path: Path, loader: type[yaml.SafeLoader] | type[yaml.BaseLoader]) -> object:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileProblem(f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise FileProblem(f"{path} is {len(raw):,} bytes; at most {MAX_FILE_BYTES:,} are read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{path} is not UTF-8 text (byte {exc.start})") from None
    import yaml  # a file's commands only

    try:
        return yaml.load(text, Loader=loader)  # both loaders build plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FileProblem(f"{path} is not valid YAML or JSON{where}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise FileProblem(f"{path} is nested too deeply") from None


def read_mapping_file(path: Path, expected: str) -> dict[str, object]:
    """A YAML or JSON file holding a mapping. BaseLoader keeps every scalar as written: YAML
    would otherwise read 2026.11 as a float; pydantic still turns "true" into a bool. JSON is
    YAML too."""
    import yaml

    data = _parse(path, yaml.BaseLoader)
    if not isinstance(data, dict):
        raise FileProblem(f"{path}: expected {expected}")
    return data


@functools.cache
def _flag_loader() -> type[yaml.SafeLoader]:
    """YAML as people write flag files: ``on``/``off``/``yes``/``no`` are variant names, not
    booleans (only ``true``/``false`` are), as in YAML 1.2."""
    import yaml

    class FlagLoader(yaml.SafeLoader):
        pass

    FlagLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    FlagLoader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return FlagLoader


def read_flag_file(path: Path) -> dict[str, object]:
    data = _parse(path, _flag_loader())
    if not isinstance(data, dict):
        raise FileProblem(f"{path}: expected a mapping with key, owner, variants and rules")
    return data
