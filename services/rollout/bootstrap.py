"""Wires the rollout service. Until its issue builds it, it only answers `status`."""

from __future__ import annotations

from services.stub import status_only

setup = status_only("rollout")
