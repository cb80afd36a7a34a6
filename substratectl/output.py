"""How substratectl prints: a table for people, JSON for scripts, one line on error."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from operator import itemgetter
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, TextIO, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import to_json

from common.fields import printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# rich and yaml are imported where they are used: most commands print JSON or a line, and
# every command starts by importing this module (a tenth of a second of each start).


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


def _sorted(data: object) -> object:
    """JSON data with every mapping's keys in order (what json.dump's sort_keys prints)."""
    if type(data) is dict:
        return {
            key: _sorted(value) if type(value) in (dict, list) else value
            for key, value in sorted(data.items())
        }
    if type(data) is list:
        return [_sorted(value) for value in data]
    return data


class Stream:
    """A list printed as it comes, page by page: with --json the same document ``emit_json``
    prints for the whole list, else (-o name) one name a line."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.count = 0

    def items(self, page: Sequence[BaseModel]) -> None:
        """Print these response models."""
        if not page:
            return
        if not self.as_json:
            self.out.write("".join(f"{name}\n" for item in page for name in names(item)))
        else:
            # The page as json.dump(indent=2, sort_keys=True) prints a list, by the serializer
            # pydantic already has (json's own indenting encoder is Python), without its
            # brackets: the pages join into one list.
            data = _sorted_models(page)
            text = to_json(data, indent=2).decode()
            self.out.write(("[" if self.count == 0 else ",") + text[1:-2])
        self.count += len(page)

    def end(self) -> None:
        if self.as_json:
            self.out.write("\n]\n" if self.count else "[]\n")
        self.out.flush()


def _sorted_models(page: Sequence[BaseModel]) -> list[Any]:
    """What ``_sorted`` of each item's JSON dump is, made faster for a page of one plain model
    (a listing): each item's field values in the keys' order, and the serializer that prints
    them does what a dump in JSON mode does to each value."""
    kind = type(page[0])
    keys, nested = _plain_fields(kind)
    if not keys or any(type(item) is not kind for item in page):
        return _sorted_page([item.model_dump(mode="json", by_alias=True) for item in page])
    pick = itemgetter(*keys)
    out = []
    for item in page:
        fields = item.__dict__
        if any(fields[key] for key in nested):  # mappings inside: their keys sorted too
            out.append(_sorted(item.model_dump(mode="json", by_alias=True)))
        else:
            out.append(dict(zip(keys, pick(fields), strict=True)))
    return out


_SCALARS = (str, int, float, bool, datetime, type(None))


@functools.cache
def _plain_fields(kind: type[BaseModel]) -> tuple[list[str], list[str]]:
    """A model whose JSON dump is its fields' values under their own names: its field names
    sorted, and those that may hold more than a scalar. ([], []) for any other model (an
    alias, a serializer of its own, extra or computed fields, a JSON setting)."""
    decorators = kind.__pydantic_decorators__
    config = kind.model_config
    if (
        any(f.alias or f.serialization_alias or f.exclude for f in kind.model_fields.values())
        or kind.model_computed_fields
        or decorators.field_serializers
        or decorators.model_serializers
        or config.get("extra") == "allow"
        or any(key.startswith("ser_json") for key in config)
    ):
        return [], []
    nested = [name for name, f in kind.model_fields.items() if not _scalar(f.annotation)]
    return sorted(kind.model_fields), nested


def _scalar(annotation: Any) -> bool:
    if get_origin(annotation) is Literal:
        return True
    if get_origin(annotation) in (Union, UnionType):
        return all(_scalar(arg) for arg in get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, (*_SCALARS, Enum))


def _sorted_page(page: list[Any]) -> list[Any]:
    """``_sorted`` of each item, faster for a page of items with the same keys (a listing):
    the key order is worked out once."""
    first = page[0]
    if type(first) is not dict or len(first) < 2:
        return [_sorted(item) for item in page]
    keys = sorted(first)
    pick = itemgetter(*keys)
    nested = [key for key in keys if type(first[key]) in (dict, list)]
    out = []
    for item in page:
        if type(item) is not dict or item.keys() != first.keys() or any(item[k] for k in nested):
            out.append(_sorted(item))
        else:
            out.append(dict(zip(keys, pick(item), strict=True)))
    return out


def emit_yaml(payload: object) -> None:
    """YAML for people who edit what they read (``flags show -o yaml`` prints a flag file)."""
    import yaml

    yaml.safe_dump(
        json.loads(json.dumps(plain(payload), default=str)),
        sys.stdout,
        sort_keys=False,
        allow_unicode=True,
    )


@dataclass
class Style:
    """How this run prints, set once from the options (``-o wide``) and the terminal."""

    wide: bool = False


STYLE = Style()
# An ISO 8601 time as the services send it (in JSON answers and records).
_ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?$")


def _as_time(value: object) -> datetime | None:
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str) and _ISO_TIME.match(value):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def age(when: datetime, now: datetime | None = None) -> str:
    """``3m ago`` or ``in 2h``: the one way a table shows a time (JSON keeps ISO 8601)."""
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    later, seconds = seconds < 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)}{unit}"
            break
    else:
        amount = f"{int(seconds)}s"
    return f"in {amount}" if later else f"{amount} ago"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    when = _as_time(value)
    if when is not None:
        return age(when)
    # Whatever a cell reported is shown, never sent to the terminal as control characters.
    return printable(str(value))


# The columns that hold a state, and the colour of each state's word on a terminal.
STATE_COLUMNS = {"status", "state", "verdict", "result", "up", "compliance", "phase"}
GOOD = {"online", "completed", "healthy", "ok", "yes", "compliant", "done", "applied", "open"}
BAD = {
    "offline", "halted", "failed", "unhealthy", "refused", "no", "aborted", "overdue",
    "blocked", "decommissioned", "not_compliant", "expired",
}  # fmt: skip


def _styled(column: str, text: str) -> Text | str:
    from rich.text import Text

    if column not in STATE_COLUMNS or not colour():
        return text
    if text in GOOD:
        return Text(text, style="green")
    if text in BAD:
        return Text(text, style="red")
    return Text(text, style="yellow") if text != "-" else text


def _value(row: BaseModel | Mapping[str, object], column: str) -> object:
    if isinstance(row, BaseModel):
        return getattr(row, column, None)
    return row.get(column)


def on_terminal() -> bool:
    """Live redrawing only when a person is looking (not in a pipe or a file)."""
    return sys.stdout.isatty()


def colour() -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return on_terminal() and not os.environ.get("NO_COLOR")


def console(buffer: io.StringIO | None = None) -> Console:
    """A rich console: styled on a terminal, plain text everywhere else."""
    from rich.console import Console

    return Console(
        file=buffer or sys.stdout,
        width=None if buffer is None else 400,
        color_system="auto" if colour() else None,
        force_terminal=colour(),
        highlight=False,
        soft_wrap=True,
    )


def table(
    rows: Sequence[BaseModel | Mapping[str, object]],
    columns: Sequence[str],
    wide: Sequence[str] = (),
) -> str:
    """Rows as aligned columns with upper-case headers (bold on a terminal); ``wide`` columns
    are added with ``-o wide``. Times read as ages (``3m ago``), states in colour on a
    terminal."""
    if not rows:
        return "(none)"
    from rich.table import Table

    columns = [*columns, *wide] if STYLE.wide else list(columns)
    grid = Table(
        box=None, show_edge=False, pad_edge=False, header_style="bold" if colour() else None
    )
    for column in columns:
        grid.add_column(column.upper().replace("_", " "), no_wrap=True)
    for row in rows:
        grid.add_row(*(_styled(col, _cell(_value(row, col))) for col in columns))
    buffer = io.StringIO()
    console(buffer).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def _exact(when: datetime) -> str:
    return f"{when.isoformat(timespec='seconds').replace('+00:00', 'Z')} ({age(when)})"


def moment(value: object) -> str:
    """A time in a sentence or a record: exact (ISO 8601, UTC as Z) and as an age."""
    when = _as_time(value)
    return printable(str(value)) if when is None else _exact(when)


def _field(value: object) -> str:
    """A record's field: a time exact and as an age, a list or mapping as JSON (never a
    Python repr)."""
    when = _as_time(value)
    if when is not None:
        return _exact(when)
    if isinstance(value, list | tuple | Mapping):
        return printable(json.dumps(plain(value), default=str))
    return _cell(value)


def fields(record: Mapping[str, object]) -> str:
    width = max((len(k) for k in record), default=0)
    return "\n".join(f"{k.ljust(width)}  {_field(v)}" for k, v in record.items())


def plural(n: int, thing: str, things: str | None = None) -> str:
    """``1 cell``, ``3 cells``."""
    return f"{n:,} {thing if n == 1 else things or thing + 's'}"


def names(answer: object) -> list[str]:
    """``-o name``: what identifies each thing in an answer (a cell's id, a flag's key, a
    release's version, an operator's name), one per line for the next command."""
    items = answer if isinstance(answer, list | tuple) else [answer]
    found = []
    for item in items:
        data = plain(item)
        if isinstance(data, Mapping):
            for key in ("id", "key", "version", "name", "cell"):
                if data.get(key) is not None:
                    found.append(str(data[key]))
                    break
    return found


def fail(message: str, *, as_json: bool, code: int = 1) -> int:
    """Report an error on one line (stderr; JSON on stdout too with --json) and return the exit
    code."""
    if as_json:
        emit_json({"error": message})
    print(f"error: {message}", file=sys.stderr)
    return code
