"""What the agent knows, kept in CELL_STATE_DIR so a restart loses nothing.

One JSON file, replaced atomically (write, fsync, rename), readable by the agent's user only:
it holds the broker URL a rotation gave and the key rotated secrets are sealed to. Sequence
numbers are reserved in blocks so a heartbeat does not cost a disk write, and a restart skips
to the end of the last block: numbers may jump, they never repeat or go back.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cell_agent.journal import write_atomically
from common import sealing

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
    # The private half of the key the registry seals rotated secrets to (made once; a state
    # written before sealing gets one at the next start).
    rotation_key: str | None = None


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "agent-state.json"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            self.state = AgentState.model_validate_json(self.path.read_text())
            if self.state.rotation_key is None or self.path.stat().st_mode & 0o077:
                self.state.rotation_key = self.state.rotation_key or sealing.new_private_key()
                self.save()
        else:
            self.state = AgentState(
                incarnation=uuid.uuid4().hex, rotation_key=sealing.new_private_key()
            )
            self.save()
        # Start past anything a previous run may have used.
        self._next_seq = self.state.seq_reserved_until

    def save(self) -> None:
        write_atomically(self.path, self.state.model_dump_json(indent=2))

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

    def public_key(self) -> str:
        assert self.state.rotation_key is not None
        return sealing.public_key(self.state.rotation_key)

    def unseal(self, sealed: str, context: str) -> str:
        assert self.state.rotation_key is not None
        return sealing.unseal(self.state.rotation_key, sealed, context)

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
    private = data.pop("rotation_key", None)
    if private:
        # What the operator's ``cells show`` calls the cell's rotation key, to compare.
        data["rotation_key"] = sealing.public_key(private)
    return json.dumps(data, indent=2)
