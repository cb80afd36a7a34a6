"""A fleet for one test: cells with running agents, releases with images in moto's ECR, a
rollout service with soaks of a second, and the operator's commands through substratectl."""

from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import redis.asyncio as aioredis

from common.bus.rabbit_bus import RabbitBus
from common.messages import CELLS_EXCHANGE, CellUpgrade
from common.requests.registry import CellsShow
from common.requests.rollout import RolloutShow
from common.topology import SERVICE_QUEUES, Binding, Topology, consuming_queue
from testing.broker import read_all
from testing.cells import create_cell, new_cell_id, show, start_agent, status_is
from testing.polling import eventually
from testing.processes import Proc, Processes, Service, start_rollout
from testing.services import Services
from testing.versions import fresh_minor

HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


POLICY = """
soak_seconds: {staging: 1, saas: 1, dedicated: 1}
progress_deadline_seconds: 60
"""


@dataclass
class Cell:
    id: str
    stage: str
    url: str
    state: Path
    agent: Proc
    env: dict[str, str]


class Fleet:
    """Cells with running agents, and the operator's commands, for one test."""

    def __init__(self, procs: Processes, moto: str, root: Path, bus: RabbitBus) -> None:
        self.procs, self.moto, self.root, self.bus = procs, moto, root, bus
        self.cells: list[Cell] = []
        self.reports = f"test.rollout.{root.name}"[:200]
        # Newer than every release published before in the session (an older one is refused).
        self.minor = fresh_minor()
        self._reports: list[CellUpgrade] = []
        self.rollout: Service | None = None

    def version(self, patch: int) -> str:
        # Unique per test: releases of earlier tests stay published in the session.
        return f"3000.{self.minor}.{patch}"

    async def tap(self) -> None:
        """A queue receiving a copy of every cell's upgrade reports."""
        await self.bus.declare(
            Topology((), consuming_queue(self.reports, Binding(CELLS_EXCHANGE, "*.upgrade")))
        )

    async def add(self, stage: str, n: int = 1, **env: str) -> list[Cell]:
        added = []
        for _ in range(n):
            cell_id = new_cell_id()
            created = await create_cell(self.procs, cell_id, stage=stage)
            added.append((cell_id, created["amqp_url"]))
        cells = [
            Cell(
                cell_id,
                stage,
                url,
                self.root / cell_id,
                await self._agent(cell_id, url, self.root / cell_id, env),
                env,
            )
            for cell_id, url in added
        ]
        for c in cells:
            await eventually(
                partial(status_is, self.procs, c.id, "online"),
                timeout=30,
                interval=0.3,
                what=f"{c.id} online",
            )
        self.cells += cells
        return cells

    def of(self, stage: str) -> list[Cell]:
        return [c for c in self.cells if c.stage == stage]

    async def stop_agent(self, cell: Cell) -> None:
        await self.procs.stop(cell.agent)

    async def start_agent(self, cell: Cell) -> None:
        cell.agent = await self._agent(cell.id, cell.url, cell.state, cell.env)

    async def _agent(self, cell_id: str, url: str, state: Path, env: dict[str, str]) -> Proc:
        extra: dict[str, Any] = env  # CELL_* variables only, never start_agent's own arguments
        return await start_agent(self.procs, self.moto, cell_id, url, state, **extra)

    async def publish(
        self,
        patch: int,
        *,
        missing_image: bool = False,
        reversible: bool = True,
        maintenance: bool = False,
        health: str = "",
        required: bool = False,
        security: bool = False,
        deadline: str | None = None,
    ) -> str:
        """Publish release ``patch``; ``health``: the release file's ``health`` (YAML)."""
        version = self.version(patch)
        digest = push_image(self.moto, "substrate/server", version)
        if missing_image:
            digest = "sha256:" + "0" * 64
        path = self.root / f"{version}.yaml"
        path.write_text(
            f"version: {version}\nreversible: {str(reversible).lower()}\n"
            f"required: {str(required).lower()}\ncomponents:\n"
            f"  - name: server\n    image: {HOST}/substrate/server\n    digest: {digest}\n"
            f"    requires_maintenance: {str(maintenance).lower()}\n"
            + (f"health: {health}\n" if health else "")
            + f"security: {str(security).lower()}\n"
            + (f"deadline: {deadline}\n" if deadline else "")
        )
        code, _, err = await self.procs.ctl("release", "publish", str(path))
        assert code == 0, err
        return version

    async def status(self, version: str) -> dict[str, Any]:
        code, result, err = await self.procs.ctl("rollout", "status", version)
        assert code == 0, err
        return dict(result)

    async def wait_state(self, version: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """The rollout's status as substratectl shows it, once in one of ``states`` (looked at
        from the test's process until then: ``Processes.look``)."""

        async def reached() -> dict[str, Any] | None:
            look = await self.procs.look(RolloutShow(version=version))
            if look is not None and look.state not in states:
                return None
            status = await self.status(version)
            return status if status["state"] in states else None

        result: dict[str, Any] = await eventually(
            reached, timeout=timeout, interval=0.3, what=f"{version} {'/'.join(states)}"
        )
        return result

    async def installed(self, cell: Cell) -> str | None:
        return (await show(self.procs, cell.id)).get("installed_release")

    async def wait_installed(self, cells: list[Cell], version: str, timeout: float = 30) -> None:
        """Until substratectl shows every one of ``cells`` on ``version`` (looked at from the
        test's process until then: ``Processes.look``)."""

        async def looks_there(cell: Cell) -> bool:
            look = await self.procs.look(CellsShow(id=cell.id))
            return look is None or look.installed_release == version

        async def all_there() -> bool:
            if not all([await looks_there(c) for c in cells]):
                return False
            return all([await self.installed(c) == version for c in cells])

        await eventually(
            all_there, timeout=timeout, interval=0.3, what=f"{len(cells)} cells on {version}"
        )

    async def upgrades(self) -> list[CellUpgrade]:
        """Every upgrade report so far (the tap keeps them; reading drains, so they are kept)."""
        got = [
            CellUpgrade.model_validate_json(m.body)
            for m in await read_all(self.procs.services.amqp_url, self.reports)
        ]
        self._reports += got
        return list(self._reports)

    async def explain(self, cell: Cell) -> dict[str, Any]:
        code, result, err = await self.procs.ctl("rollout", "explain", cell.id)
        assert code == 0, err
        return dict(result)


async def forget_rollouts(services: Services) -> None:
    """Rollout's keys and queues emptied: a rollout service started next knows only what the
    test makes."""
    redis = aioredis.from_url(services.redis_url)
    keys = [k async for k in redis.scan_iter("rollout:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()
    for queue in SERVICE_QUEUES["rollout"]:
        await services.api.call("DELETE", f"/queues/{services.vhost}/{queue.name}/contents")


async def quick_fleet(procs: Processes, moto: str, root: Path, bus: RabbitBus, **env: str) -> Fleet:
    """A rollout service (with ``env``) with the short soaks of POLICY (the registry is the
    caller's), and no cells yet."""
    rollout = await start_rollout(procs, **env)
    (root / "policy.yaml").write_text(POLICY)
    code, _, err = await procs.ctl("rollout", "policy", "set", str(root / "policy.yaml"))
    assert code == 0, err
    f = Fleet(procs, moto, root, bus)
    f.rollout = rollout
    return f


def push_image(moto: str, repository: str, tag: str) -> str:
    """Put an image into moto's ECR; its digest."""
    ecr = boto3.client(
        "ecr",
        endpoint_url=moto,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with suppress(ecr.exceptions.RepositoryAlreadyExistsException):
        ecr.create_repository(repositoryName=repository)
    # moto derives the digest from the layers' digests; without layers it draws one of 101
    # random values, and two images would share a digest now and then.
    layer = "sha256:" + hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"digest": layer},
            "layers": [{"digest": layer, "size": 1}],
        }
    )
    image = ecr.put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag)
    return str(image["image"]["imageId"]["imageDigest"])


def _ecr(moto: str) -> Any:
    return boto3.client(
        "ecr",
        endpoint_url=moto,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def hide_image(moto: str, repository: str, tag: str) -> str:
    """Delete an image from moto's ECR (as a fresh moto would not have it); its manifest, to
    put it back with the same digest."""
    ecr = _ecr(moto)
    [image] = ecr.batch_get_image(repositoryName=repository, imageIds=[{"imageTag": tag}])["images"]
    ecr.batch_delete_image(repositoryName=repository, imageIds=[{"imageTag": tag}])
    return str(image["imageManifest"])


def restore_image(moto: str, repository: str, tag: str, manifest: str) -> str:
    image = _ecr(moto).put_image(repositoryName=repository, imageManifest=manifest, imageTag=tag)
    return str(image["image"]["imageId"]["imageDigest"])


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
