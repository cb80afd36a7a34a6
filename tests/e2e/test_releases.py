"""Publishing releases through substratectl and a running rollout service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.bus.rabbit_bus import RabbitBus
from common.messages import EVENTS_EXCHANGE, ReleasePublished
from common.topology import Binding, Topology, consuming_queue
from testing.broker import read_all
from testing.cells import create_cell, new_cell_id, register_as_cell
from testing.polling import eventually
from testing.processes import Processes, start_registry
from testing.services import Services
from testing.versions import fresh_version

DIGEST = "sha256:" + "ab" * 32


def release_yaml(version: str, extra: str = "") -> str:
    return f"""
version: {version}
notes: Faster workspace starts.
components:
  - name: server
    image: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/substrate/server
    digest: {DIGEST}
  - name: db
    image: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/substrate/db
    digest: {DIGEST}
    requires_maintenance: true
{extra}"""


@pytest.fixture
async def rollout(procs: Processes, control_plane: None) -> None:
    await procs.start("rollout", "substrate-rollout")

    async def answers() -> bool:
        code, _, _ = await procs.ctl("release", "list")
        return code == 0

    await eventually(answers, timeout=30, interval=0.3, what="rollout answering")


@pytest.mark.e2e
async def test_publish_list_show_and_the_event(
    procs: Processes, rollout: None, tmp_path: Path, services: Services, bus: RabbitBus
) -> None:
    events = f"test.releases.{tmp_path.name}"
    await bus.declare(
        Topology((), consuming_queue(events, Binding(EVENTS_EXCHANGE, "release.published")))
    )
    older, version = fresh_version(), fresh_version()
    for v in (older, version):
        path = tmp_path / f"{v}.yaml"
        path.write_text(release_yaml(v))
        code, record, err = await procs.ctl("release", "publish", str(path))
        assert code == 0, err
        assert record["version"] == v and record["components"] == 2
        assert record["requires_maintenance"] is True and record["reversible"] is True

    code, listed, _ = await procs.ctl("release", "list")
    versions = [r["version"] for r in listed]
    assert versions.index(version) < versions.index(older), "newest first"
    code, shown, _ = await procs.ctl("release", "show", version)
    assert code == 0 and shown["release"]["notes"] == "Faster workspace starts."
    assert [c["name"] for c in shown["release"]["components"]] == ["server", "db"]

    code, _, err = await procs.ctl("release", "publish", str(tmp_path / f"{version}.yaml"))
    assert code == 1 and f"release {version} is already published" in err
    # One older than the newest would reach no cell: refused, and a dry run says so first.
    late = older.rsplit(".", 1)[0] + ".2"
    (tmp_path / "late.yaml").write_text(release_yaml(late))
    code, preview, _ = await procs.ctl(
        "release", "publish", "--dry-run", str(tmp_path / "late.yaml")
    )
    assert code == 1 and preview["refused"].startswith(f"release {late} is older than {version}")
    code, _, err = await procs.ctl("release", "publish", str(tmp_path / "late.yaml"))
    assert code == 1 and f"release {late} is older than {version}, the newest published" in err
    code, _, _ = await procs.ctl("release", "show", late)
    assert code == 1, "nothing was published"

    published = await eventually(lambda: read_all(services.amqp_url, events), timeout=10)
    bodies = [ReleasePublished.model_validate_json(m.body) for m in published]
    assert {b.release.version for b in bodies} == {version, older}


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (release_yaml("2026.11"), "version: Value error, '2026.11' is not a semantic version"),
        (release_yaml("2026.11.1").replace(DIGEST, "sha256:nothex", 1), "components.0.digest"),
        (release_yaml("2026.11.1").replace("requires_maintenance", "requires_maintainance"),
         "components.1.requires_maintainance: Extra inputs are not permitted"),
        (release_yaml("2026.11.1").replace("name: db", "name: server"),
         "component names must be unique; repeated: server"),
        (release_yaml("2026.11.1").replace("components:", "parts:"), "components: Field required"),
        ("version: [unclosed", "is not valid YAML or JSON (line 1"),
        ("- just\n- a list\n", "expected a mapping with version and components"),
    ],
)  # fmt: skip
async def test_bad_release_files_are_refused_naming_the_problem(
    procs: Processes, rollout: None, tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "release.yaml"
    path.write_text(content)
    code, out, err = await procs.ctl("release", "publish", str(path))
    assert code == 1 and needle in err, err
    assert out == {"error": err.strip().removeprefix("error: ")}
    code, _, _ = await procs.ctl("release", "show", "2026.11.1")
    assert code == 1, "nothing was published"


@pytest.mark.e2e
async def test_a_missing_file_and_an_unknown_version(
    procs: Processes, rollout: None, tmp_path: Path
) -> None:
    code, _, err = await procs.ctl("release", "publish", str(tmp_path / "nope.yaml"))
    assert code == 1 and "cannot read" in err and "nope.yaml" in err
    code, _, err = await procs.ctl("release", "show", "9.9.9")
    assert code == 1 and "release '9.9.9' is not published" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.e2e
async def test_rollout_plan_follows_the_fleet_from_the_registrys_events(
    procs: Processes, rollout: None, tmp_path: Path
) -> None:
    # These cells register but never heartbeat: keep them online for the test's length.
    await start_registry(procs, SUBSTRATE_OFFLINE_AFTER_SECONDS="300")
    staging, saas = new_cell_id(), new_cell_id()
    dedicated = [new_cell_id() for _ in range(4)]
    silent = new_cell_id()
    for cell_id, stage in [(staging, "staging"), (saas, "saas"), (silent, "dedicated")] + [
        (c, "dedicated") for c in dedicated
    ]:
        created = await create_cell(procs, cell_id, stage=stage)
        if cell_id != silent:
            await register_as_cell(created["amqp_url"], cell_id)
    version = fresh_version()
    path = tmp_path / "release.yaml"
    path.write_text(release_yaml(version))
    code, _, err = await procs.ctl("release", "publish", str(path))
    assert code == 0, err

    async def planned() -> dict[str, Any] | None:
        code, result, _ = await procs.ctl("rollout", "plan", version)
        waves = result["stages"]["dedicated"] if code == 0 else []
        mine = {c for w in waves for c in w} & set(dedicated)
        return result if mine == set(dedicated) else None

    result = await eventually(planned, timeout=20, interval=0.5, what="plan with every cell")
    assert staging in {c for w in result["stages"]["staging"] for c in w}
    assert saas in {c for w in result["stages"]["saas"] for c in w}
    assert result["skipped"][silent] == "not_registered"
    canary = result["stages"]["dedicated"][0]
    assert len(canary) == 1

    code, _, err = await procs.ctl("rollout", "plan", "0.0.1")
    assert code == 1 and "release '0.0.1' is not published" in err
