"""Whole processes, started as a user would, and stopped by process id at teardown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Services

BIN = Path(sys.executable).parent


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    services: Services
    logs: Path
    running: list[Proc] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "SUBSTRATE_AMQP_URL": self.services.amqp_url,
            "SUBSTRATE_REDIS_URL": self.services.redis_url,
            "SUBSTRATE_RABBITMQ_API_URL": self.services.api_url,
            **extra,
        }

    async def start(self, name: str, *argv: str, **env: str) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                str(BIN / argv[0]), *argv[1:], env=self.env(**env), stdout=sink, stderr=sink
            )
        proc = Proc(name, process, log)
        self.running.append(proc)
        return proc

    async def stop(self, proc: Proc, timeout: float = 20) -> int:
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.process.wait(), timeout)
            except TimeoutError:
                proc.process.kill()
                await proc.process.wait()
        assert proc.process.returncode is not None
        return proc.process.returncode

    async def ctl(self, *args: str, **env: str) -> tuple[int, Any, str]:
        """Run ``substratectl --json ARGS``: exit code, parsed stdout, stderr."""
        process = await asyncio.create_subprocess_exec(
            str(BIN / "substratectl"), "--json", *args,
            env=self.env(**env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        parsed = json.loads(out) if out.strip() else None
        return process.returncode, parsed, err.decode()


@pytest.fixture
async def procs(services: Services, tmp_path: Path) -> AsyncIterator[Processes]:
    running = Processes(services, tmp_path)
    yield running
    for proc in reversed(running.running):
        if proc.process.returncode is None:
            proc.process.kill()
            await proc.process.wait()
