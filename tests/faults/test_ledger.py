"""The ledger itself: it must catch what the fault tests rely on it to catch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testing.ledger import APPLY_COMMAND, Ledger


def _apply(state: Path, release: str, component: str) -> None:
    """What an agent's command applier runs for one component."""
    env = {"CELL_STATE_DIR": str(state), "SUBSTRATE_RELEASE": release,
           "SUBSTRATE_COMPONENT": component, "PATH": "/usr/bin:/bin"}  # fmt: skip
    subprocess.run(["sh", "-c", APPLY_COMMAND], env=env, check=True)


def test_the_ledger_tells_applied_lost_twice_and_unasked(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _apply(a, "1.0.0", "server")
    _apply(b, "1.0.0", "server")
    _apply(b, "1.0.0", "server")  # b applied it twice
    _apply(b, "0.9.9", "server")  # and something nobody asked for
    ledger = Ledger()
    for cell in ("a", "b", "c"):  # c never applied its confirmed command
        ledger.confirm(cell, "1.0.0", ["server"])
        ledger.read(cell, tmp_path / cell)
    assert ledger.lost == [("c", "1.0.0", "server")]
    assert ledger.twice == [("b", "1.0.0", "server")]
    assert ledger.unasked == [("b", "0.9.9", "server")]
    with pytest.raises(AssertionError, match="1 lost, 1 applied twice, 1 unasked"):
        ledger.check()


def test_a_clean_ledger_passes(tmp_path: Path) -> None:
    _apply(tmp_path, "1.0.0", "server")
    ledger = Ledger()
    ledger.confirm("a", "1.0.0", ["server"])
    ledger.read("a", tmp_path)
    ledger.check()
    assert ledger.summary().startswith("ledger: 1 confirmed, 1 applied once, 0 lost")
