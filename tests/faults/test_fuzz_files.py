"""Bad input from the operator's side (RELIABILITY.md 7, for files): every file substratectl
reads, from valid to garbage (wrong types, huge strings, deep nesting, bad UTF-8, duplicate
keys), is either a valid request or refused with a FileProblem or a ValidationError, which the
CLI prints as one line naming the problem (exit 1). Never another exception: that would be a
traceback, and nothing would say what is wrong with the file."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.requests import Request
from common.requests.flags import FlagsSet
from common.requests.rollout import PolicySet, ReleasePublish
from substratectl.context import FileProblem, read_flag_file, read_mapping_file
from testing.processes import BIN

pytestmark = pytest.mark.fault

# More under make chaos (SUBSTRATE_FUZZ_EXAMPLES=2000).
EXAMPLES = int(os.environ.get("SUBSTRATE_FUZZ_EXAMPLES", "60"))

VALID: dict[str, dict[str, Any]] = {
    "release": {"version": "2026.11.2", "components": [
        {"name": "server", "image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/s",
         "digest": "sha256:" + "a" * 64}]},
    "policy": {"soak_seconds": {"staging": 1, "saas": 1, "dedicated": 1}},
    "flag": {"key": "editor", "owner": "team", "rules": [{"serve": "on"}]},
}  # fmt: skip

# What a file's command does with it: read it, then build the request from what it read.
Read = Callable[[Path], Request[Any]]
COMMANDS: dict[str, Read] = {
    "release": lambda p: ReleasePublish.model_validate({"release": read_mapping_file(p, "a")}),
    "policy": lambda p: PolicySet.model_validate({"policy": read_mapping_file(p, "a")}),
    "flag": lambda p: FlagsSet.model_validate({"flag": read_flag_file(p)}),
}

junk_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=50), st.integers(10_000, 2_000_000).map(lambda n: "x" * n),
    st.sampled_from(["on", "off", "yes", "2026.11", "-1", "1e999", "~", "&a", "*a", "!!python/x"]),
)  # fmt: skip
junk = st.recursive(
    junk_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)  # fmt: skip


def _mutated(doc: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The valid document with some of its keys given junk, dropped or added."""
    return st.fixed_dictionaries(
        {k: st.one_of(st.just(v), junk) for k, v in doc.items()},
        optional={"extra": junk},
    )


def _rendered(kind: str) -> st.SearchStrategy[bytes]:
    doc = VALID[kind]
    as_text = st.one_of(
        _mutated(doc).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        _mutated(doc).map(json.dumps),
        junk.map(yaml.safe_dump),
        st.text(max_size=300),
        # Duplicate keys: YAML keeps the last, JSON too; either way one value reaches the model.
        st.just('{"version": "1.0.0", "version": 3, "components": []}'),
        st.just('{"key": "a", "key": "b", "owner": "t", "rules": []}'),
        # Deep nesting, past Python's recursion limit (1,000) and back.
        st.integers(1, 3_000).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 400).map(lambda n: "a:\n" + "".join("  " * i + "- \n" for i in range(n))),
    ).map(lambda t: t.encode())
    bad_utf8 = st.binary(max_size=200).map(lambda b: b + b"\xff\xfe\xc3\x28")
    return st.one_of(as_text, bad_utf8)


def _check(kind: str, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.yaml"
        path.write_bytes(body)
        try:
            COMMANDS[kind](path)
        except (FileProblem, ValidationError) as exc:
            assert str(exc).strip(), "a refusal says what is wrong"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_rendered("release"))
def test_fuzz_release_files(body: bytes) -> None:
    _check("release", body)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_rendered("policy"))
def test_fuzz_policy_files(body: bytes) -> None:
    _check("policy", body)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_rendered("flag"))
def test_fuzz_flag_files(body: bytes) -> None:
    _check("flag", body)


def test_the_valid_files_are_accepted(tmp_path: Path) -> None:
    for kind, doc in VALID.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(doc))
        assert COMMANDS[kind](path) is not None


def test_the_cli_says_what_is_wrong_with_a_file_in_one_line(tmp_path: Path) -> None:
    """As the operator sees it: exit 1, one line naming the file and the problem, no traceback,
    and nothing sent (the file is refused before the broker is dialled)."""
    cases = {
        "binary.yaml": b"version: \xff\xfe\n",
        "deep.yaml": b"[" * 5000 + b"]" * 5000,
        "huge.yaml": b"version: " + b"x" * (2 * 1024 * 1024),
    }
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        done = subprocess.run(
            [str(BIN / "substratectl"), "release", "publish", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60, check=False,
            # Nothing listens there: a command that got as far as the broker would say so.
            env={**os.environ, "SUBSTRATE_AMQP_URL": "amqp://u:p@127.0.0.1:1/"},
        )  # fmt: skip
        assert done.returncode == 1, (name, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in done.stderr, lines
