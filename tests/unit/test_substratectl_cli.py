"""substratectl's argument conventions: global options anywhere, an example for every command,
times as people type them, and no traceback whatever is typed."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.requests.registry import ListedCell
from common.times import ago, at
from substratectl.cells import selector
from substratectl.cli import MODULE_OF, build_parser, command_word, main
from substratectl.conventions import EXAMPLES, completion_script, leaves
from substratectl.output import Stream, age, emit_json, names, plural, table


def test_global_options_are_taken_anywhere_and_shown_in_every_commands_help() -> None:
    parser = build_parser()
    for argv in (
        ["-o", "yaml", "flags", "show", "k"],
        ["flags", "show", "k", "-o", "yaml"],
        ["flags", "show", "--output=yaml", "k"],
    ):
        assert parser.parse_args(argv).output == "yaml", argv
    assert parser.parse_args(["cells", "list", "--json"]).json is True
    assert parser.parse_args(["cells", "list", "-o", "wide"]).output == "wide"
    # Given before the command, the command's own parser does not reset it.
    assert parser.parse_args(["-o", "json", "cells", "list"]).output == "json"
    for words, leaf in leaves(parser):
        text = leaf.format_help()
        assert "-o {table,wide,json,yaml,name}" in text, words
        assert "examples:\n  substratectl " + words in text, words


def test_every_command_has_an_example_and_every_example_a_command() -> None:
    commands = {words for words, _ in leaves(build_parser())}
    assert commands == set(EXAMPLES)
    parser = build_parser()
    for examples in EXAMPLES.values():
        for example in examples:
            argv = shlex.split(example.split("#")[0].split("|")[0].split(">")[0])[1:]
            parser.parse_args(argv)  # every example is a valid command line


def test_a_command_built_alone_parses_as_it_does_among_all() -> None:
    """A run builds only its command's module; every example parses to the same arguments that
    way, and every command word is known to the table that picks the module."""
    everything = build_parser()
    top = {words.split()[0] for words, _ in leaves(everything)} - {"completion"}
    assert top == set(MODULE_OF)
    for examples in EXAMPLES.values():
        for example in examples:
            argv = shlex.split(example.split("#")[0].split("|")[0].split(">")[0])[1:]
            word = command_word(argv)
            assert word == argv[0], example
            alone = vars(build_parser(word).parse_args(argv))
            whole = vars(everything.parse_args(argv))
            assert alone.keys() == whole.keys(), example
            for key, value in alone.items():
                if callable(value):
                    assert value.__qualname__ == whole[key].__qualname__, example
                elif isinstance(value, datetime):  # "2h" from now, read twice
                    assert abs(value - whole[key]) < timedelta(minutes=1), example
                else:
                    assert value == whole[key], example
    assert command_word(["-o", "json", "cells", "list"]) == "cells"
    assert command_word(["--output", "cells", "rollout"]) == "rollout"
    assert command_word(["--json", "-v", "--output=yaml", "audit"]) == "audit"
    assert command_word(["--version"]) is None


def test_version_and_completion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("substratectl 0.")
    for shell in ("bash", "zsh", "fish"):
        assert "substratectl" in completion_script(shell)
    assert main(["completion", "fish"]) == 0
    assert "complete" in capsys.readouterr().out


def test_times_are_iso_or_a_duration_from_or_before_now() -> None:
    now = datetime.now(UTC)
    assert abs(at("30m") - (now + timedelta(minutes=30))) < timedelta(seconds=5)
    assert abs(ago("7d") - (now - timedelta(days=7))) < timedelta(seconds=5)
    assert at("2026-12-07T09:00:00") == datetime(2026, 12, 7, 9, tzinfo=UTC)
    assert at("2026-12-07T09:00:00+01:00").utcoffset() == timedelta(hours=1)
    with pytest.raises(argparse.ArgumentTypeError, match="neither a time"):
        at("tomorrow")


def test_tables_show_ages_names_and_plurals() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert age(now - timedelta(minutes=3, seconds=5), now) == "3m ago"
    assert age(now + timedelta(hours=2, minutes=1), now) == "in 2h"
    assert age(now - timedelta(seconds=4), now) == "4s ago"
    recent = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    assert table([{"id": "a", "last_heartbeat_at": recent}], ["id", "last_heartbeat_at"]) == (
        "ID  LAST HEARTBEAT AT\na   5m ago"
    )
    assert names([{"id": "a"}, {"key": "k"}, {"version": "1.2.3"}]) == ["a", "k", "1.2.3"]
    assert (plural(1, "cell"), plural(3, "cell"), plural(1_000, "component")) == (
        "1 cell", "3 cells", "1,000 components",
    )  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.lists(
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(
                [
                    "-o",
                    "--output",
                    "--interval",
                    "--limit",
                    "--at",
                    "--since",
                    "--stage",
                    "--json",
                    "-1",
                    "0",
                    "--",
                    "-",
                    "\x00",
                    "é",
                    "--yes",
                ]
            ),
        ),
        max_size=6,
    ),
)
def test_no_typed_line_makes_a_traceback(words: str, junk: list[str]) -> None:
    """Whatever follows a command, parsing ends in a parsed line or a usage error (exit 2
    with one message), never an exception."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args([*words.split(), *junk])
        except SystemExit as exited:
            assert exited.code in (0, 2)
    assert "Traceback" not in err.getvalue()


def test_a_streamed_list_is_the_document_the_whole_list_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """cells list --all prints page by page; with --json the same JSON as emit_json of the
    whole list (keys sorted, nested too), and -o name one id a line."""
    at_ = datetime(2026, 12, 1, 8, 30, 1, 250_000, tzinfo=UTC)
    # Cells with a mapping inside and cells without (a listing prints those field by field),
    # with every kind of value a listing holds.
    cells = [
        ListedCell(id=f"s-{i}", stage="saas", region="eu-west-1", org="ü-org", status="online",
                   created_at=at_, last_heartbeat_at=at_ if i else None, maintenance=i == 1,
                   maintenance_seconds_total=i * 12.5, applied_generation=i or None,
                   compliance="out_of_sla" if i == 2 else None, flags_behind=i == 2,
                   refused_registrations=[{"z": 1, "a": [{"y": 2, "b": 3}]}] if i == 1 else [])
        for i in range(3)
    ]  # fmt: skip
    for pages in ([], [cells], [cells[:2], cells[2:]]):
        emit_json([c for page in pages for c in page])
        whole = capsys.readouterr().out
        stream = Stream(sys.stdout, as_json=True)
        for page in pages:
            stream.items(page)
        stream.end()
        assert json.loads(capsys.readouterr().out) == json.loads(whole)
    stream = Stream(sys.stdout, as_json=True)
    stream.items(cells)
    stream.end()
    streamed = capsys.readouterr().out
    emit_json(cells)
    assert streamed.replace("\\u00fc", "ü") == capsys.readouterr().out.replace("\\u00fc", "ü")
    stream = Stream(sys.stdout, as_json=False)
    stream.items(cells)
    stream.end()
    assert capsys.readouterr().out == "s-0\ns-1\ns-2\n"


def test_a_selector_names_the_field_and_the_problem() -> None:
    tests = selector("region=eu-west-1, installed_release!=2026.12.1,org=")
    assert [(m.field, m.op, m.value) for m in tests] == [
        ("region", "=", "eu-west-1"), ("installed_release", "!=", "2026.12.1"), ("org", "=", ""),
    ]  # fmt: skip
    for text, problem in (
        ("password=x", "unknown field 'password'"),
        ("region", "not FIELD=VALUE or FIELD!=VALUE: 'region'"),
        ("org=" + "x" * 129, "the value for org is over 128 characters"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(problem)):
            selector(text)
