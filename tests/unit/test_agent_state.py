"""The agent's state directory: sequence numbers never repeat across restarts, and rotated
credentials survive a restart unless the customer has since given a new URL."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cell_agent.state import SEQ_BLOCK, StateStore, dump
from common import sealing

ENV_URL = "amqp://acme:first@broker:5672/"


def test_sequence_numbers_only_grow_across_restarts(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = [store.next_seq() for _ in range(SEQ_BLOCK + 5)]
    assert first == sorted(set(first))
    incarnation = store.state.incarnation

    again = StateStore(tmp_path)  # a restart, even a crash right after the last report
    assert again.state.incarnation == incarnation
    assert again.next_seq() > first[-1]


def test_rotated_credentials_survive_a_restart_until_a_new_url_is_given(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.broker_url(ENV_URL) == ENV_URL
    store.rotate(ENV_URL, "amqp://acme:second@broker:5672/", "cred-2")

    restarted = StateStore(tmp_path)
    assert restarted.broker_url(ENV_URL) == "amqp://acme:second@broker:5672/"
    assert restarted.credential_id(ENV_URL) == "cred-2"

    # Re-bootstrapped with fresh credentials: the new CELL_AMQP_URL wins.
    fresh = "amqp://acme:third@broker:5672/"
    assert restarted.broker_url(fresh) == fresh
    assert restarted.credential_id(fresh) is None


def test_state_dump_shows_no_secret(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.rotate(ENV_URL, "amqp://acme:s3cret@broker:5672/", "cred-2")
    text = dump(store.state)
    assert "cred-2" in text and "s3cret" not in text
    # The public half of the rotation key only: the private one never leaves the file.
    assert store.state.rotation_key is not None and store.state.rotation_key not in text
    assert json.loads(text)["rotation_key"] == store.public_key()


def test_the_state_file_is_readable_by_the_agent_only_even_one_written_before(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    store.rotate(ENV_URL, "amqp://acme:s3cret@broker:5672/", "cred-2")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) & 0o077 == 0
    # A state file an earlier agent left world-readable, without a rotation key.
    data = json.loads(store.path.read_text())
    del data["rotation_key"]
    store.path.write_text(json.dumps(data))
    os.chmod(store.path, 0o644)
    again = StateStore(tmp_path)
    assert stat.S_IMODE(again.path.stat().st_mode) == 0o600
    assert again.state.rotation_key is not None
    assert again.broker_url(ENV_URL) == "amqp://acme:s3cret@broker:5672/"


def test_a_secret_sealed_to_the_agent_opens_with_its_state_only_and_in_its_context(
    tmp_path: Path,
) -> None:
    agent, other = StateStore(tmp_path / "a"), StateStore(tmp_path / "b")
    sealed = sealing.seal(agent.public_key(), "new-password", "acme:c2")
    assert "new-password" not in sealed
    assert agent.unseal(sealed, "acme:c2") == "new-password"
    # Another key, another rotation's context, or a changed byte: nothing opens.
    for key_holder, context, body in (
        (other, "acme:c2", sealed),
        (agent, "acme:c3", sealed),
        (agent, "other:c2", sealed),
        (agent, "acme:c2", sealed[:-2] + ("AA" if sealed[-2:] != "AA" else "BB")),
    ):
        with pytest.raises(sealing.SealingError):
            key_holder.unseal(body, context)
