"""The agent's state directory: sequence numbers never repeat across restarts, and rotated
credentials survive a restart unless the customer has since given a new URL."""

from __future__ import annotations

from pathlib import Path

from cell_agent.state import SEQ_BLOCK, StateStore, dump

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
