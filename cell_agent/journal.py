"""The upgrade journal in CELL_STATE_DIR: what the control plane wants, what is applied, and
where an interrupted upgrade was. Each file is replaced atomically, so a crash at any point
leaves either the old or the new content, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel

from common.health import HealthSpec, Verdict
from common.releases import Release
from common.vocabulary import UpgradePhase


class Desired(BaseModel):
    generation: int
    release: Release | None
    received_at: AwareDatetime
    # What to check after applying it (None: nothing; the outcome is the verdict).
    health: HealthSpec | None = None


class Applied(BaseModel):
    generation: int = -1
    release: Release | None = None


class Progress(BaseModel):
    """An upgrade under way (or finished but not yet reported)."""

    generation: int
    phase: UpgradePhase
    previous: Release | None
    error: str | None = None
    # The outcome was published; a restart must not report it again.
    reported: bool = False
    # Components of this generation already applied: a restart mid-apply goes on from the next.
    done: tuple[str, ...] = ()
    # After it applied: baking until bake_until, then watching until watch_until, then done;
    # a restart carries on where it was. The verdict, the check that decided it and (in
    # ``error``) what that check saw, once there is one.
    health: Literal["baking", "watching", "done"] | None = None
    bake_until: AwareDatetime | None = None
    watch_until: AwareDatetime | None = None
    verdict: Verdict | None = None
    check: str | None = None


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` whole (a crash leaves the old file or the new one), readable
    by the agent's user only: the state directory holds the cell's broker URL and the key its
    rotated secrets are sealed to, and what is next to them need not be read by others."""
    tmp = path.with_name(path.name + ".tmp")
    # Made 0600 before anything is written to it; a leftover temporary file's mode is not kept.
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory / "upgrade"
        self.directory.mkdir(parents=True, exist_ok=True)
        # Read on every heartbeat and flag evaluation; only this journal writes it.
        self._applied: Applied | None = None

    def _read(self, name: str, model: type[BaseModel]) -> BaseModel | None:
        path = self.directory / name
        return model.model_validate_json(path.read_text()) if path.exists() else None

    def _write(self, name: str, value: BaseModel) -> None:
        write_atomically(self.directory / name, value.model_dump_json(indent=2))

    @property
    def desired(self) -> Desired | None:
        value = self._read("desired.json", Desired)
        assert value is None or isinstance(value, Desired)
        return value

    @property
    def applied(self) -> Applied:
        if self._applied is None:
            value = self._read("applied.json", Applied)
            assert value is None or isinstance(value, Applied)
            self._applied = value or Applied()
        return self._applied

    @property
    def progress(self) -> Progress | None:
        value = self._read("progress.json", Progress)
        assert value is None or isinstance(value, Progress)
        return value

    def want(self, desired: Desired) -> bool:
        """Record a desired state if it is newer than any seen; True if it was."""
        current = self.desired
        if current is not None and current.generation >= desired.generation:
            return False
        self._write("desired.json", desired)
        return True

    def set_progress(self, progress: Progress) -> None:
        self._write("progress.json", progress)

    def set_applied(self, applied: Applied) -> None:
        self._write("applied.json", applied)
        self._applied = applied
