"""Flag changes made later: at their time (once, across two replicas and a kill -9), or once a
second operator approved a change of answers in an approval stage; and the incident controls
(enable/disable, show -o yaml that set takes back)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from testing.cells import create_cell, new_cell_id, start_agent, status_is
from testing.fleet import write
from testing.operators import add_operator
from testing.polling import eventually
from testing.ports import free_port
from testing.processes import Processes, http_get, start_flags, start_registry

# Broker users are not per vhost: names of their own, so parallel tests never share one.
BOB = f"bob-{uuid.uuid4().hex[:6]}"
CAROL = f"carol-{uuid.uuid4().hex[:6]}"

FLAG = """
key: {key}
owner: team-editor
rules:
  - name: everyone
    serve: on
"""


async def _flag(procs: Processes, key: str) -> dict[str, Any]:
    code, flag, err = await procs.ctl("flags", "show", key)
    assert code == 0, err
    return flag  # type: ignore[no-any-return]


@pytest.mark.e2e
async def test_a_timed_change_is_made_once_at_its_time_across_two_replicas_and_a_kill(
    own_procs: Processes, tmp_path: Path
) -> None:
    procs = own_procs
    first = await start_flags(procs, SUBSTRATE_DUE_INTERVAL_SECONDS="0.2")
    await start_flags(procs, SUBSTRATE_DUE_INTERVAL_SECONDS="0.2")
    key = f"editor-{uuid.uuid4().hex[:6]}"
    code, _, err = await procs.ctl("flags", "set", write(tmp_path / "f.yaml", FLAG.format(key=key)))
    assert code == 0, err

    at = datetime.now(UTC) + timedelta(seconds=8)
    code, kept, err = await procs.ctl("flags", "disable", key, "--at", at.isoformat())
    assert code == 0 and not kept["changed"] and at.isoformat() in kept["waits"], err
    code, pending, _ = await procs.ctl("flags", "pending")
    assert [(p["key"], p["approval"], p["flag"]["enabled"]) for p in pending] == [
        (key, "not_needed", False)
    ]
    assert (await _flag(procs, key))["enabled"] is True
    # One replica is killed before the time; the other (and the killed one, started again)
    # are both due to make it.
    first.process.kill()
    await first.process.wait()
    await start_flags(procs, SUBSTRATE_DUE_INTERVAL_SECONDS="0.2")

    async def made() -> bool:
        return (await _flag(procs, key))["enabled"] is False

    await eventually(made, timeout=40, interval=0.2, what="the timed change")
    assert datetime.now(UTC) >= at
    code, history, _ = await procs.ctl("flags", "history", key)
    # The write that makes a timed change removes it, so nothing is left to make again.
    assert [h["action"] for h in history] == ["updated", "created"]
    assert datetime.fromisoformat(history[0]["at"]) >= at
    code, pending, _ = await procs.ctl("flags", "pending")
    assert pending == []

    # A time in the past is refused and nothing is kept.
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    code, _, err = await procs.ctl("flags", "enable", key, "--at", past)
    assert code == 1 and "at: " in err and "is in the past" in err
    code, _, err = await procs.ctl("flags", "enable", key, "--at", "tomorrow")
    assert code == 2 and "--at" in err
    assert (await procs.ctl("flags", "pending"))[1] == []


@pytest.mark.e2e
async def test_a_change_of_dedicated_answers_waits_for_a_second_operator(
    own_procs: Processes, moto: str, tmp_path: Path
) -> None:
    procs = own_procs
    await start_registry(procs)
    await start_flags(procs, SUBSTRATE_APPROVAL_STAGES="dedicated")
    bob = await add_operator(procs, BOB, "operator")
    carol = await add_operator(procs, CAROL, "operator")
    cell = new_cell_id()
    created = await create_cell(procs, cell, "dedicated")
    port = free_port()
    await start_agent(procs, moto, cell, created["amqp_url"], tmp_path / "state",
                      metrics_port=port, CELL_SYNC_SECONDS="3600")  # fmt: skip
    await eventually(lambda: status_is(procs, cell, "online"), timeout=20, interval=0.3)
    key = f"editor-{uuid.uuid4().hex[:6]}"
    flag = write(tmp_path / "f.yaml", FLAG.format(key=key))

    async def asked() -> dict[str, Any] | None:
        # Until the roster reaches flags, bob is no operator there.
        code, kept, _ = await procs.ctl("flags", "set", flag, **bob)
        return kept if code == 0 else None

    kept = await eventually(asked, timeout=30, interval=0.3, what=f"{BOB}'s change kept")
    assert not kept["changed"] and f"approval by an operator other than op-{BOB}" in kept["waits"]
    assert "1 cell(s)" in kept["waits"]
    code, _, err = await procs.ctl("flags", "show", key)
    assert code == 1 and "does not exist" in err, "nothing changed yet"
    code, _, err = await procs.ctl("flags", "approve", key, **bob)
    assert code == 1 and "another operator must approve it" in err
    code, _, err = await procs.ctl("flags", "set", flag, **carol)
    assert code == 1 and f"has a pending change (asked by op-{BOB})" in err

    code, made, err = await procs.ctl("flags", "approve", key, **carol)
    assert code == 0 and made["changed"] and made["action"] == "created", err
    code, history, _ = await procs.ctl("flags", "history", key)
    assert history[0]["actor"] == f"op-{BOB}, approved by op-{CAROL}"

    async def on_at_the_cell() -> bool:
        status, body = await http_get(port, f"/flags/{key}")
        return status == 200 and '"value":true' in body.replace(" ", "")

    await eventually(on_at_the_cell, timeout=20, interval=0.2, what="the flag at the cell")

    # The kill switch, and the file that `flags set` takes back; disabling changes a
    # dedicated cell's answer, so it waits for approval too.
    code, text, _ = await procs.ctl_text("flags", "show", key, "-o", "yaml")
    assert code == 0 and text.startswith(f"key: {key}\n") and "snapshot_version" not in text
    code, same, err = await procs.ctl("flags", "set", write(tmp_path / "back.yaml", text))
    assert code == 0 and same["changed"] is False, err
    code, kept, err = await procs.ctl("flags", "disable", key, **carol)
    assert code == 0 and "approval" in kept["waits"], err
    code, dropped, err = await procs.ctl("flags", "cancel", key, **bob)
    assert code == 0 and dropped["asked_by"] == f"op-{CAROL}", err
    code, _, err = await procs.ctl("flags", "approve", key, **bob)
    assert code == 1 and "has no pending change" in err
