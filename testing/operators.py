"""Operators for the tests: a person's broker user with a role, added as the tests' admin."""

from __future__ import annotations

from common import broker_urls
from testing.processes import Processes


async def add_operator(procs: Processes, name: str, role: str) -> dict[str, str]:
    """``substratectl operators add NAME --role ROLE``; the environment to run substratectl as
    them."""
    code, added, err = await procs.ctl("operators", "add", name, "--role", role)
    assert code == 0, err
    assert added["name"] == f"op-{name}" and added["role"] == role
    url = broker_urls.with_credentials(procs.services.amqp_url, added["name"], added["password"])
    return {"SUBSTRATE_AMQP_URL": url}
