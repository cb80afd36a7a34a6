"""How components reach the cell. ``local`` renders each component's manifest under the state
directory and switches it atomically (where a real cell would call helm or kubectl);
``command`` runs CELL_APPLY_COMMAND per component."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Protocol

from cell_agent.journal import write_atomically
from common.releases import Component, Release


class ApplyFailed(Exception):
    pass


class Applier(Protocol):
    async def apply(self, component: Component, release: Release) -> None: ...

    async def healthy(self, release: Release) -> bool: ...


class LocalApplier:
    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "components"
        self.directory.mkdir(parents=True, exist_ok=True)

    def manifest(self, name: str) -> dict[str, str] | None:
        path = self.directory / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    async def apply(self, component: Component, release: Release) -> None:
        manifest = {
            "name": component.name,
            "image": f"{component.image}@{component.digest}",
            "digest": component.digest,
            "release": release.version,
        }
        await asyncio.to_thread(
            write_atomically, self.directory / f"{component.name}.json", json.dumps(manifest)
        )

    async def healthy(self, release: Release) -> bool:
        return all(
            (m := self.manifest(c.name)) is not None and m["digest"] == c.digest
            for c in release.components
        )


class CommandApplier:
    """Runs ``command`` (through the shell) once per component with SUBSTRATE_COMPONENT,
    SUBSTRATE_IMAGE, SUBSTRATE_DIGEST and SUBSTRATE_RELEASE in its environment."""

    def __init__(self, command: str) -> None:
        self.command = command

    async def apply(self, component: Component, release: Release) -> None:
        process = await asyncio.create_subprocess_shell(
            self.command,
            env={
                **os.environ,
                "SUBSTRATE_COMPONENT": component.name,
                "SUBSTRATE_IMAGE": component.image,
                "SUBSTRATE_DIGEST": component.digest,
                "SUBSTRATE_RELEASE": release.version,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip()[-300:]
            raise ApplyFailed(f"{component.name}: command exited {process.returncode}: {tail}")

    async def healthy(self, release: Release) -> bool:
        return True  # the command's exit status is its health check
