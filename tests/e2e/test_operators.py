"""Operators with broker users of their own: each service authorises every request by the role
of its broker-validated user_id, and audits every write and every refusal."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from common import broker_urls
from common.bus.errors import BusError
from common.bus.rabbit_bus import RabbitBus
from common.messages import RpcRequest
from testing.fleet import write
from testing.operators import add_operator
from testing.polling import eventually
from testing.processes import (
    Processes,
    start_control_plane,
    start_registry,
)

# Broker users are not per vhost: names of their own, so parallel tests never share one.
ALICE = f"alice-{uuid.uuid4().hex[:6]}"
BOB = f"bob-{uuid.uuid4().hex[:6]}"
CAROL = f"carol-{uuid.uuid4().hex[:6]}"

RELEASE = f"""
version: 2026.1.1
components:
  - {{name: server, image: registry.example/server, digest: "sha256:{"a" * 64}"}}
"""

FLAG = """
key: {key}
owner: team-editor
rules:
  - name: everyone
    serve: on
"""


async def _audit(procs: Processes, *args: str) -> list[dict[str, Any]]:
    code, out, err = await procs.ctl("audit", *args)
    assert code == 0, err
    assert out["missing"] == []
    entries: list[dict[str, Any]] = out["entries"]
    return entries


async def _a_viewer_cannot_write(
    procs: Processes, viewer: dict[str, str], flag: str, tmp_path: Path
) -> None:
    """Publish, set a flag, pause, approve, manage operators: each refused in one line naming
    the role it needs."""
    code, _, err = await procs.ctl("flags", "set", flag, **viewer)
    assert code == 1 and f"op-{ALICE} is a viewer: flags.set needs the operator role" in err, err
    release = write(tmp_path / "r.yaml", RELEASE)
    for args, method, role in (
        (["rollout", "pause", "2026.1.1"], "rollout.pause", "operator"),
        (["release", "publish", release], "release.publish", "operator"),
        (["rollout", "approve", "2026.1.1"], "rollout.approve", "operator"),
        (["flags", "approve", "editor"], "flags.approve", "operator"),
        (["operators", "add", "mallory", "--role", "admin"], "operators.add", "admin"),
    ):
        code, _, err = await procs.ctl(*args, **viewer)
        assert code == 1 and f"{method} needs the {role} role" in err, err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.e2e
async def test_each_role_may_do_what_it_needs_and_every_write_and_refusal_is_audited(
    own_procs: Processes, moto: str, tmp_path: Path
) -> None:
    procs = own_procs
    await start_control_plane(procs, moto)
    viewer = await add_operator(procs, ALICE, "viewer")
    operator = await add_operator(procs, BOB, "operator")
    flag = write(tmp_path / "f.yaml", FLAG.format(key=f"editor-{uuid.uuid4().hex[:6]}"))

    # The roster reaches every service from the registry's event; until then they know no
    # op-alice. A viewer reads everywhere.
    async def reads_everywhere() -> bool:
        for args in (["cells", "list"], ["rollout", "list"], ["flags", "list"], ["infra", "list"]):
            code, _, _ = await procs.ctl(*args, **viewer)
            if code != 0:
                return False
        return True

    await eventually(reads_everywhere, timeout=30, interval=0.3, what="the roster everywhere")

    await _a_viewer_cannot_write(procs, viewer, flag, tmp_path)
    # An operator sets flags, and cannot decommission or manage operators.
    code, changed, err = await procs.ctl("flags", "set", flag, **operator)
    assert code == 0 and changed["changed"], err
    code, _, err = await procs.ctl("cells", "decommission", "some-cell", "--yes", **operator)
    assert code == 1 and f"op-{BOB} is an operator: cells.decommission needs the admin role" in err
    code, _, err = await procs.ctl("operators", "set-role", ALICE, "admin", **operator)
    assert code == 1 and "needs the admin role" in err
    code, listed, _ = await procs.ctl("operators", "list")
    assert {(o["name"], o["role"]) for o in listed} == {
        (f"op-{ALICE}", "viewer"),
        (f"op-{BOB}", "operator"),
    }
    assert all(o["added_by"] == broker_urls.user(procs.services.amqp_url) for o in listed)

    # Every write and every refusal, with the operator's name as the broker validated it.
    alice = await _audit(procs, "--operator", f"op-{ALICE}")
    assert {(e["service"], e["method"], e["result"], e["role"]) for e in alice} >= {
        ("flags", "flags.set", "refused", "viewer"),
        ("rollout", "rollout.pause", "refused", "viewer"),
        ("registry", "operators.add", "refused", "viewer"),
    }
    assert not [e for e in alice if e["result"] == "ok"], "a viewer's reads are not audited"
    bob = await _audit(procs, "--operator", f"op-{BOB}")
    done = [e for e in bob if e["method"] == "flags.set"]
    assert [(e["result"], e["target"]) for e in done] == [("ok", changed["key"])]
    assert [e["result"] for e in bob if e["method"] == "cells.decommission"] == ["refused"]
    code, text, _ = await procs.ctl_text("audit", "--cell", "some-cell", "-o", "json")
    assert code == 0 and '"cells.decommission"' in text
    admin = await _audit(procs, "--target", f"op-{ALICE}")
    assert [e["method"] for e in admin if e["result"] == "ok"] == ["operators.add"]

    # A role change takes effect at the next request; a removed operator is gone from the
    # broker (and so can ask nothing).
    code, _, err = await procs.ctl("operators", "set-role", f"op-{ALICE}", "operator")
    assert code == 0, err

    async def alice_writes() -> bool:
        code, _, _ = await procs.ctl("flags", "set", flag, **viewer)
        return code == 0

    await eventually(alice_writes, timeout=30, interval=0.3, what=f"{ALICE} promoted")
    code, _, err = await procs.ctl("operators", "remove", BOB)
    assert code == 0, err
    assert not await procs.services.api.user_exists(f"op-{BOB}")
    code, _, err = await procs.ctl("cells", "list", **operator)
    assert code == 1


@pytest.mark.e2e
async def test_a_forged_user_id_is_refused_by_the_broker(own_procs: Processes) -> None:
    procs = own_procs
    await start_registry(procs)
    viewer = await add_operator(procs, CAROL, "viewer")
    bus = await RabbitBus.connect(viewer["SUBSTRATE_AMQP_URL"], name="test-forger")
    try:
        # Her own identity is fine: a viewer may list cells.
        assert await bus.request("registry", "cells.list", {}, timeout=30) == []
        # Claiming the admin's identity never reaches the registry.
        request = RpcRequest(service="registry", method="cells.create", params={})
        with pytest.raises(BusError):
            await bus.publisher.publish(request, user_id="guest", reply_to="amq.rabbitmq.reply-to")
    finally:
        await bus.close(drain_timeout=1)
    admin = await RabbitBus.connect(procs.services.amqp_url, name="test-auditor")
    try:
        entries = await admin.request("registry", "audit.list", {}, timeout=30)
    finally:
        await admin.close(drain_timeout=1)
    assert [e["method"] for e in entries] == ["operators.add"]


@pytest.mark.e2e
async def test_bad_operator_input_is_one_line_and_stores_nothing(own_procs: Processes) -> None:
    procs = own_procs
    await start_registry(procs)
    for args, code_wanted, needle in (
        (["add", "Not_A_Name", "--role", "viewer"], 1, "name: Value error, operator name"),
        (["add", "dave", "--role", "king"], 2, "invalid choice: 'king'"),
        (["add", "admin", "--role", "viewer"], 1, "op-admin exists"),
        (["set-role", "nobody", "admin"], 1, "no operator op-nobody"),
        (["remove", "nobody"], 1, "no operator op-nobody"),
    ):
        code, _, err = await procs.ctl("operators", *args)
        assert code == code_wanted and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1 or code == 2, err
    code, listed, _ = await procs.ctl("operators", "list")
    assert code == 0 and listed == []
    assert not await procs.services.api.user_exists("op-dave")
    code, _, err = await procs.ctl("audit", "--since", "yesterday")
    assert code == 2 and "--since" in err
