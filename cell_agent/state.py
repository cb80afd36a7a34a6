"""What the agent knows, kept in CELL_STATE_DIR so a restart loses nothing.

One JSON file, replaced atomically (write, fsync, rename). Sequence numbers are reserved in
blocks so a heartbeat does not cost a disk write, and a restart skips to the end of the last
block: numbers may jump, they never repeat or go back.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

SEQ_BLOCK = 100


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


class Credentials(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str
    credential_id: str
    # The CELL_AMQP_URL these credentials replaced. If the customer later sets a different
    # URL (e.g. re-bootstrapped with fresh credentials), that URL wins over the rotated one.
    replaced_env_url: str


class AgentState(BaseModel):
    incarnation: str
    seq_reserved_until: int = 0
    credentials: Credentials | None = None


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "agent-state.json"
        directory.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.state = AgentState.model_validate_json(self.path.read_text())
        else:
            self.state = AgentState(incarnation=uuid.uuid4().hex)
            self.save()
        # Start past anything a previous run may have used.
        self._next_seq = self.state.seq_reserved_until

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(self.state.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def next_seq(self) -> int:
        if self._next_seq >= self.state.seq_reserved_until:
            self.state.seq_reserved_until = self._next_seq + SEQ_BLOCK
            self.save()
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def broker_url(self, env_url: str) -> str:
        creds = self.state.credentials
        if creds is not None and creds.replaced_env_url == _digest(env_url):
            return creds.url
        return env_url

    def credential_id(self, env_url: str) -> str | None:
        creds = self.state.credentials
        if creds is not None and creds.replaced_env_url == _digest(env_url):
            return creds.credential_id
        return None

    def rotate(self, env_url: str, new_url: str, credential_id: str) -> None:
        self.state.credentials = Credentials(
            url=new_url, credential_id=credential_id, replaced_env_url=_digest(env_url)
        )
        self.save()


def dump(state: AgentState) -> str:
    """For ``cell-agent status``: the state without secrets."""
    data = json.loads(state.model_dump_json())
    if data.get("credentials"):
        data["credentials"] = {"credential_id": data["credentials"]["credential_id"]}
    return json.dumps(data, indent=2)
