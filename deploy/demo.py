"""compose's one-shot demo job: the AWS emulator's ECR repository and templates bucket, a demo
fleet of five cells (one staging, one saas, three dedicated) whose agents start with the
credentials it writes to a shared volume, short soaks, a demo release and a demo flag.

Run as an operator (``SUBSTRATE_AMQP_URL`` with the operator's user), against the emulator
(``AWS_ENDPOINT_URL``). Safe to run again: what exists is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
from contextlib import suppress
from pathlib import Path

import boto3

from common.bus.errors import BusError, RemoteError
from common.bus.rabbit_bus import RabbitBus
from common.flags import Flag
from common.requests import Status
from common.requests.flags import FlagsSet
from common.requests.registry import CellsCreate, CellsRotateCredentials
from common.requests.rollout import PolicySet, ReleaseFile, ReleasePublish, RolloutPolicy
from common.settings import ControlPlaneSettings, load
from common.topology import SERVICES

log = logging.getLogger("demo")

FLEET = (
    ("demo-staging", "staging"),
    ("demo-saas", "saas"),
    ("demo-dedicated-1", "dedicated"),
    ("demo-dedicated-2", "dedicated"),
    ("demo-dedicated-3", "dedicated"),
)
REGISTRY_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
REPOSITORY = "substrate/server"
VERSION = "2026.11.1"
POLICY = RolloutPolicy.model_validate(
    {"soak_seconds": {"staging": 5, "saas": 5, "dedicated": 5}, "progress_deadline_seconds": 120}
)
FLAG = Flag.model_validate(
    {
        "key": "new-editor",
        "owner": "team-editor",
        "description": "the new editor (demo)",
        "rules": [
            {
                "name": "staging first",
                "when": [{"attribute": "stage", "op": "in", "values": ["staging"]}],
                "serve": "on",
            }
        ],
    }
)


def aws(bucket: str) -> str:
    """The ECR repository (with the demo image) and the templates bucket; the image's digest."""
    ecr = boto3.client("ecr")
    with suppress(ecr.exceptions.RepositoryAlreadyExistsException):
        ecr.create_repository(repositoryName=REPOSITORY)
    layer = "sha256:" + hashlib.sha256(VERSION.encode()).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"digest": layer},
            "layers": [{"digest": layer, "size": 1}],
        }
    )
    image = ecr.put_image(repositoryName=REPOSITORY, imageManifest=manifest, imageTag=VERSION)
    s3 = boto3.client("s3")
    with suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        region = s3.meta.region_name
        s3.create_bucket(
            Bucket=bucket,
            CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
        )
    return str(image["image"]["imageId"]["imageDigest"])


async def wait_for_services(bus: RabbitBus, timeout: float) -> None:
    for service in SERVICES:
        while True:
            try:
                await bus.call(Status(), service=service, timeout=timeout)
                break
            except BusError as exc:
                log.info("waiting for %s (%s)", service, exc)


async def fleet(bus: RabbitBus, out: Path, timeout: float) -> None:
    """Each cell created once; its URL file is the mark (a second run skips it)."""
    for cell_id, stage in FLEET:
        url_file = out / f"{cell_id}.url"
        if url_file.exists():
            continue
        try:
            created = await bus.call(
                CellsCreate(id=cell_id, stage=stage, region="eu-west-1", org="demo-org"),
                timeout=timeout,
            )
            url = created.amqp_url
        except RemoteError as exc:
            if exc.code != "exists":
                raise
            # Made by an earlier run whose volume is gone: new credentials, shown once.
            url = (await bus.call(CellsRotateCredentials(id=cell_id), timeout=timeout)).amqp_url
        url_file.write_text(url + "\n")
        log.info("cell %s (%s) created", cell_id, stage)


async def main(args: argparse.Namespace) -> int:
    settings = load(ControlPlaneSettings)
    digest = await asyncio.to_thread(aws, args.bucket)
    bus = await RabbitBus.connect(settings.amqp_url, name="demo", give_up_after=120)
    try:
        await wait_for_services(bus, settings.rpc_timeout_seconds)
        args.out.mkdir(parents=True, exist_ok=True)
        await fleet(bus, args.out, settings.rpc_timeout_seconds)
        await bus.call(PolicySet(policy=POLICY), timeout=settings.rpc_timeout_seconds)
        release = ReleaseFile.model_validate(
            {
                "version": VERSION,
                "notes": "the demo release (compose)",
                "components": [
                    {
                        "name": "server",
                        "image": f"{REGISTRY_HOST}/{REPOSITORY}",
                        "digest": digest,
                        "requires_maintenance": True,
                    }
                ],
                # As make dev's: unhealthy where a cell's state directory holds "unhealthy".
                "health": {
                    "bake_seconds": 2,
                    "interval_seconds": 1,
                    "checks": [
                        {
                            "name": "no-unhealthy-file",
                            "type": "command",
                            "command": ["sh", "-c", 'test ! -e "$CELL_STATE_DIR/unhealthy"'],
                        }
                    ],
                },
            }
        )
        try:
            await bus.call(ReleasePublish(release=release), timeout=settings.rpc_timeout_seconds)
            log.info("release %s published", VERSION)
        except RemoteError as exc:
            if exc.code != "exists":
                raise
        await bus.call(FlagsSet(flag=FLAG), timeout=settings.rpc_timeout_seconds)
    finally:
        await bus.close(drain_timeout=1)
    print(json.dumps({"cells": [c for c, _ in FLEET], "release": VERSION, "flag": FLAG.key}))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/demo"),
        help="where each cell's agent URL is written (the agents read it)",
    )
    parser.add_argument("--bucket", default="substrate-templates")
    sys.exit(asyncio.run(main(parser.parse_args())))
