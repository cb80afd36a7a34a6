"""substratectl as its users' hands expect (kubectl, gh): every read command's JSON is what the
contract's schema says, a flag's YAML goes back through `flags set`, the narrow table and
colour on a terminal (a real pseudo-terminal) and neither through a pipe, and with the broker
down every command fails with one line."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from yarl import URL

from substratectl.cli import build_parser
from substratectl.conventions import EXAMPLES, leaves
from testing.fleet import write
from testing.ports import free_port
from testing.processes import (
    BIN,
    Processes,
    start_control_plane,
)

RELEASE = f"""
version: 2026.3.1
components:
  - {{name: server, image: registry.example/server, digest: "sha256:{"b" * 64}"}}
"""
FLAG = """
key: {key}
owner: team-editor
description: "A flag with everything: variants, two rules, a split"
variants: {{on: true, off: false, half: "maybe"}}
default_variant: off
rules:
  - name: staging
    when: [{{attribute: stage, op: in, values: [staging]}}]
    serve: on
  - name: half the rest
    split: {{on: 50, half: 50}}
"""
WINDOWS = """
time_zone: Europe/Berlin
windows: [{days: [sat, sun], start: "02:00", duration_minutes: 240}]
"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _schema(contract: dict[str, Any], method: str) -> dict[str, Any]:
    schema = dict(contract["requests"][method]["response"])
    schema["$defs"] = {**contract.get("$defs", {}), **schema.get("$defs", {})}
    return schema


@pytest.mark.e2e
async def test_every_read_command_answers_json_its_contract_describes(
    own_procs: Processes, moto: str, tmp_path: Path
) -> None:
    procs = own_procs
    await start_control_plane(procs, moto)
    cell, key = f"cli-{uuid.uuid4().hex[:6]}", f"cli-{uuid.uuid4().hex[:6]}"
    for args in (
        ["cells", "create", cell, "--stage", "staging", "--region", "eu-west-1", "--org", "acme"],
        ["release", "publish", write(tmp_path / "r.yaml", RELEASE)],
        ["flags", "set", write(tmp_path / "f.yaml", FLAG.format(key=key))],
        ["windows", "set", "--cell", cell, write(tmp_path / "w.yaml", WINDOWS)],
    ):
        code, _, err = await procs.ctl(*args)
        assert code == 0, (args, err)
    code, contract, err = await procs.ctl("schema")
    assert code == 0, err

    version = "2026.3.1"
    reads: list[tuple[list[str], str, str]] = [
        # (the command, the method whose response it prints, where in the output)
        (["cells", "list"], "registry/cells.list", "."),
        (["cells", "show", cell], "registry/cells.show", "."),
        (["cells", "audit", cell], "registry/cells.audit", "."),
        (["release", "list"], "rollout/release.list", "."),
        (["release", "show", version], "rollout/release.show", "."),
        (["rollout", "plan", version], "rollout/rollout.plan", "."),
        (["rollout", "status", version], "rollout/rollout.status", "."),
        (["rollout", "list"], "rollout/rollout.list", "."),
        (["rollout", "explain", cell], "rollout/rollout.explain", "."),
        (["rollout", "policy", "show"], "rollout/rollout.policy.show", "."),
        (["windows", "list"], "rollout/windows.list", "."),
        (["flags", "list"], "flags/flags.list", "."),
        (["flags", "show", key], "flags/flags.show", "."),
        (["flags", "history", key], "flags/flags.history", "."),
        (["flags", "pending"], "flags/flags.pending", "."),
        (["flags", "eval", key, "--cell", cell], "flags/flags.eval", "."),
        (["flags", "preview", str(tmp_path / "f.yaml")], "flags/flags.preview", "."),
        (["infra", "list"], "infra_compliance/infra.list", "."),
        (["infra", "status"], "infra_compliance/infra.status", "."),
        (["operators", "list"], "registry/operators.list", "."),
        (["status"], "*/status", "[].detail"),
        (["audit", "--since", "1h"], "*/audit.list", ".entries"),
    ]
    for args, method, where in reads:
        code, out, err = await procs.ctl(*args)
        assert code == 0, (args, err)
        schema = _schema(contract, method)
        if where == ".":
            documents = [out]
        elif where == ".entries":
            documents = [out["entries"]]
            assert out["missing"] == []
        else:
            documents = [row["detail"] for row in out]
        for document in documents:
            try:
                jsonschema.validate(document, schema)
            except jsonschema.ValidationError as exc:
                raise AssertionError(f"{shlex.join(args)} -o json: {exc.message}") from None
        # -o name: the ids alone, one per line, for the next command in a pipe.
        if args in (["cells", "list"], ["flags", "list"], ["release", "list"]):
            code, names, err = await procs.ctl_text(*args, "-o", "name")
            assert code == 0 and names.split() == [
                r.get("id") or r.get("key") or r.get("version") for r in out
            ], names

    # A flag printed with -o yaml is the file flags set takes: set again, nothing changes.
    code, text, err = await procs.ctl_text("flags", "show", key, "-o", "yaml")
    assert code == 0, err
    code, result, err = await procs.ctl("flags", "set", write(tmp_path / "again.yaml", text))
    assert code == 0 and result["changed"] is False, (text, err)
    # For people: the variants and rules in words and JSON, never Python's reprs.
    code, text, err = await procs.ctl_text("flags", "show", key)
    assert code == 0 and '"maybe"' in text and "{'" not in text and "True" not in text, text
    assert 'staging: stage in ["staging"] -> on' in text, text
    # An unknown flag is an error wherever it is asked for.
    code, _, err = await procs.ctl_text("flags", "eval", "no-such-flag", "--cell", cell)
    assert code == 1 and err.strip() == "error: no flag 'no-such-flag'"

    await _terminal_and_pipe(procs, cell)
    # Completion asks the registry for cell ids (argcomplete's protocol, as the shell drives it).
    line = f"substratectl cells show {cell[:6]}"
    assert cell in await _completions(procs, tmp_path, line)
    assert await _completions(procs, tmp_path, "substratectl cells list -o w") == ["wide"]


async def _completions(procs: Processes, tmp_path: Path, line: str) -> list[str]:
    out = tmp_path / "completions"
    process = await asyncio.create_subprocess_exec(
        str(BIN / "substratectl"), stdin=asyncio.subprocess.DEVNULL,
        env=procs.env(_ARGCOMPLETE="1", _ARGCOMPLETE_STDOUT_FILENAME=str(out),
                      _ARGCOMPLETE_IFS="\n", COMP_LINE=line, COMP_POINT=str(len(line))),
    )  # fmt: skip
    assert await process.wait() == 0
    return out.read_text().split()


def _on_terminal(env: dict[str, str], *args: str) -> str:
    """A command's output on a real pseudo-terminal, as a person at one sees it."""
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [str(BIN / "substratectl"), *args], stdout=follower, stderr=follower,
        stdin=subprocess.DEVNULL, env=env,
    ) as process:  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closes with the last writer
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(60)
    os.close(leader)
    assert process.returncode == 0, b"".join(chunks)
    return b"".join(chunks).decode()


async def _terminal_and_pipe(procs: Processes, cell: str) -> None:
    env = procs.env(TERM="xterm-256color", COLUMNS="200")
    env.pop("NO_COLOR", None)
    seen = await asyncio.to_thread(_on_terminal, env, "cells", "list", "--stage", "staging")
    line = next(x for x in seen.splitlines() if cell in x)
    # The state in colour (a never-heard-from cell is pending or offline), the narrow table.
    assert ANSI.search(line), repr(line)
    assert "ORG" not in ANSI.sub("", seen) and "STATUS" in ANSI.sub("", seen)
    wide = await asyncio.to_thread(_on_terminal, env, "cells", "list", "-o", "wide")
    assert "ORG" in ANSI.sub("", wide)
    plain = await asyncio.to_thread(
        _on_terminal, {**env, "NO_COLOR": "1"}, "cells", "list", "--stage", "staging"
    )
    assert not ANSI.search(plain) and cell in plain
    code, piped, err = await procs.ctl_text("cells", "list", "--stage", "staging")
    assert code == 0 and cell in piped and not ANSI.search(piped + err), repr(piped)


def _command_lines() -> list[list[str]]:
    """Every command, with the arguments of its first example (the one with --yes for the
    commands that would ask)."""
    lines = []
    for words, _ in leaves(build_parser()):
        examples = EXAMPLES[words]
        example = next((e for e in examples if "--yes" in e), examples[0])
        example = example.split("#")[0].split("|")[0].split(">")[0]
        lines.append(shlex.split(example)[1:])
    return lines


@pytest.mark.e2e
async def test_with_the_broker_down_every_command_fails_in_one_line(tmp_path: Path) -> None:
    """Unreachable, refused credentials, an unknown virtual host: one line each, exit 1, and
    soon (the figure for each is printed; bench/RESULTS.md has the measured ones)."""
    for name, text in (("release.yaml", RELEASE), ("new-editor.yaml", FLAG.format(key="k")),
                       ("policy.yaml", "failure_threshold: 0.1\n"), ("windows.yaml", WINDOWS),
                       ("cell.yaml", "AWSTemplateFormatVersion: '2010-09-09'\n")):  # fmt: skip
        (tmp_path / name).write_text(text)
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    env = {**os.environ, "SUBSTRATE_AMQP_URL": down}
    offline = {("completion",), ("schema",)}
    slowest = 0.0

    async def run(args: list[str], url: str = down) -> None:
        nonlocal slowest
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            str(BIN / "substratectl"), *args, cwd=tmp_path, env={**env, "SUBSTRATE_AMQP_URL": url},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        took = time.monotonic() - started
        slowest = max(slowest, took)
        lines = err.decode().strip().splitlines()
        assert process.returncode == 1 and len(lines) == 1, (args, out, err)
        assert "Traceback" not in err.decode() and lines[0].startswith("error: "), lines
        # Bounded by the CLI's own give-up time, not by a retry per service (status once
        # took 15.5 s and said it four times); loose enough for a loaded machine.
        assert took < 12, (args, took)

    commands = [c for c in _command_lines() if tuple(c[:1]) not in offline]
    assert len(commands) == len(EXAMPLES) - len(offline)
    for batch in range(0, len(commands), 4):
        await asyncio.gather(*(run(c) for c in commands[batch : batch + 4]))
    print(f"slowest of {len(commands)} commands with the broker down: {slowest:.1f}s")

    # Refused credentials and an unknown vhost are said as such, without retrying.
    live = os.environ["SUBSTRATE_AMQP_URL"]
    bad_password = re.sub(r"//([^:]+):[^@]+@", r"//\1:wrong@", live)
    no_vhost = str(URL(live).with_path("/no-such-vhost"))
    for url, words in ((bad_password, "refused the user name or password"),
                       (no_vhost, "refused the virtual host")):  # fmt: skip
        refused = await asyncio.create_subprocess_exec(
            str(BIN / "substratectl"), "status", env={**env, "SUBSTRATE_AMQP_URL": url},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, said = await refused.communicate()
        assert refused.returncode == 1 and words in said.decode(), said
        assert len(said.decode().strip().splitlines()) == 1
