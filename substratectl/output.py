"""How substratectl prints: a table for people, JSON for scripts, one line on error."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from common.fields import printable


def plain(payload: object) -> object:
    """JSON-ready data from a response model (or a list of them)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", by_alias=True)
    if isinstance(payload, list | tuple):
        return [plain(item) for item in payload]
    if isinstance(payload, Mapping):
        return {key: plain(value) for key, value in payload.items()}
    return payload


def emit_json(payload: object) -> None:
    json.dump(plain(payload), sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def emit_yaml(payload: object) -> None:
    """YAML for people who edit what they read (``flags show -o yaml`` prints a flag file)."""
    yaml.safe_dump(
        json.loads(json.dumps(plain(payload), default=str)),
        sys.stdout,
        sort_keys=False,
        allow_unicode=True,
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    # Whatever a cell reported is shown, never sent to the terminal as control characters.
    return printable(str(value))


def _value(row: BaseModel | Mapping[str, object], column: str) -> object:
    if isinstance(row, BaseModel):
        return getattr(row, column, None)
    return row.get(column)


def on_terminal() -> bool:
    """Colour and live redrawing only when a person is looking (not in a pipe or a file)."""
    return sys.stdout.isatty()


def console(buffer: io.StringIO | None = None) -> Console:
    """A rich console: styled on a terminal, plain text everywhere else."""
    return Console(
        file=buffer or sys.stdout,
        width=None if buffer is None else 400,
        color_system="auto" if on_terminal() else None,
        force_terminal=on_terminal(),
        highlight=False,
        soft_wrap=True,
    )


def table(rows: Sequence[BaseModel | Mapping[str, object]], columns: Sequence[str]) -> str:
    """Rows as aligned columns with upper-case headers (bold on a terminal)."""
    if not rows:
        return "(none)"
    grid = Table(
        box=None, show_edge=False, pad_edge=False, header_style="bold" if on_terminal() else None
    )
    for column in columns:
        grid.add_column(column.upper(), no_wrap=True)
    for row in rows:
        grid.add_row(*(_cell(_value(row, col)) for col in columns))
    buffer = io.StringIO()
    console(buffer).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def fields(record: Mapping[str, object]) -> str:
    width = max((len(k) for k in record), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in record.items())


def fail(message: str, *, as_json: bool, code: int = 1) -> int:
    """Report an error on one line (stderr; JSON on stdout too with --json) and return the exit
    code."""
    if as_json:
        emit_json({"error": message})
    print(f"error: {message}", file=sys.stderr)
    return code
