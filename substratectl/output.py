"""How substratectl prints: a table for people, JSON for scripts, one line on error."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime

from pydantic import BaseModel


def plain(payload: object) -> object:
    """JSON-ready data from a response model (or a list of them)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json", by_alias=True)
    if isinstance(payload, list | tuple):
        return [plain(item) for item in payload]
    return payload


def emit_json(payload: object) -> None:
    json.dump(plain(payload), sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _value(row: BaseModel | Mapping[str, object], column: str) -> object:
    if isinstance(row, BaseModel):
        return getattr(row, column, None)
    return row.get(column)


def table(rows: Sequence[BaseModel | Mapping[str, object]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(_value(row, col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


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
