"""make dev: a demo release whose image is in the local AWS emulator's ECR, a rollout policy
with short soaks (so `release publish .dev/demo-release.yaml` reaches the demo cell in
seconds), and a demo flag file. Prints the release file's path."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from contextlib import suppress
from pathlib import Path

import boto3

endpoint, out = sys.argv[1], Path(sys.argv[2])
ecr = boto3.client("ecr", endpoint_url=endpoint, region_name="eu-west-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
with suppress(ecr.exceptions.RepositoryAlreadyExistsException):
    ecr.create_repository(repositoryName="substrate/server")
# A unique layer: moto gives layerless manifests one of a few random digests.
# Newer than every demo release before it (an older one would be refused): the whole time in
# seconds, never cut to a few digits that wrap.
version = time.strftime("%Y.%-m.") + str(int(time.time()))
layer = "sha256:" + hashlib.sha256(version.encode()).hexdigest()
manifest = json.dumps({
    "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {"digest": layer}, "layers": [{"digest": layer, "size": 1}],
})  # fmt: skip
image = ecr.put_image(repositoryName="substrate/server", imageManifest=manifest, imageTag=version)
digest = image["image"]["imageId"]["imageDigest"]
(out / "demo-release.yaml").write_text(
    f"version: {version}\nnotes: a demo release (make dev)\ncomponents:\n"
    f"  - name: server\n    image: 123456789012.dkr.ecr.eu-west-1.amazonaws.com/substrate/server\n"
    f"    digest: {digest}\n"
    # Checked in each cell for 5 s after it applies: unhealthy where the cell's state directory
    # holds a file named "unhealthy" (README: make the demo canary unhealthy).
    "health:\n  bake_seconds: 5\n  interval_seconds: 1\n  checks:\n"
    "    - name: no-unhealthy-file\n      type: command\n"
    "      command: [sh, -c, 'test ! -e \"$CELL_STATE_DIR/unhealthy\"']\n"
)
(out / "dev-policy.yaml").write_text(
    "soak_seconds: {staging: 5, saas: 5, dedicated: 5}\nprogress_deadline_seconds: 120\n"
)
(out / "demo-flag.yaml").write_text(
    "key: new-editor\nowner: team-editor\ndescription: the new editor (make dev)\n"
    "rules:\n  - name: staging first\n"
    "    when: [{attribute: stage, op: in, values: [staging]}]\n    serve: on\n"
)
print(out / "demo-release.yaml")
