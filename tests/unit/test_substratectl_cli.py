"""substratectl's argument conventions: output options anywhere, times as people type them."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import pytest

from common.times import ago, at
from substratectl.cli import output_options_first


def test_output_options_are_taken_after_the_command_too() -> None:
    assert output_options_first(["flags", "show", "k", "-o", "yaml"]) == [
        "-o", "yaml", "flags", "show", "k",
    ]  # fmt: skip
    assert output_options_first(["audit", "--output=json", "--org", "x"]) == [
        "--output=json", "audit", "--org", "x",
    ]  # fmt: skip
    assert output_options_first(["cells", "list", "--json"]) == ["--json", "cells", "list"]
    assert output_options_first(["x", "--", "-o", "json"]) == ["x", "--", "-o", "json"]


def test_times_are_iso_or_a_duration_from_or_before_now() -> None:
    now = datetime.now(UTC)
    assert abs(at("30m") - (now + timedelta(minutes=30))) < timedelta(seconds=5)
    assert abs(ago("7d") - (now - timedelta(days=7))) < timedelta(seconds=5)
    assert at("2026-12-07T09:00:00") == datetime(2026, 12, 7, 9, tzinfo=UTC)
    assert at("2026-12-07T09:00:00+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(argparse.ArgumentTypeError, match="neither a time"):
        at("tomorrow")
