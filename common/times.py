"""Times as operators type them: an ISO 8601 time (UTC where no offset is given) or a duration
(90s, 30m, 12h, 7d) counted back from now (``ago``, for --since) or on from now (``at``, for
--at). A bad one is an argparse error naming the option."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\+?(\d+)([smhd])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _parse(text: str, sign: int) -> datetime:
    match = _DURATION.fullmatch(text)
    if match:
        return datetime.now(UTC) + sign * timedelta(**{_UNIT[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time (2026-12-07T09:00:00Z) nor a duration (90m, 12h, 7d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def ago(text: str) -> datetime:
    return _parse(text, -1)


def at(text: str) -> datetime:
    return _parse(text, +1)
