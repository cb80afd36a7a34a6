"""Debug access's trust policy: the support principal only, with the cell's external id, until
the expiry; never a whole account."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cell_agent.debug_access import Refused, external_id, trust_policy

ROLE = "arn:aws:iam::210987654321:role/substrate-support"
UNTIL = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)


def test_only_the_support_role_presenting_the_cells_external_id_until_the_expiry() -> None:
    policy: dict[str, Any] = trust_policy(ROLE, UNTIL, external_id("acme-prod"))
    (statement,) = policy["Statement"]
    assert statement["Principal"] == {"AWS": ROLE}
    assert statement["Condition"] == {
        "DateLessThan": {"aws:CurrentTime": "2026-12-06T12:30:00Z"},
        "StringEquals": {"sts:ExternalId": "substrate:acme-prod"},
    }


@pytest.mark.parametrize(
    "principal", ["arn:aws:iam::210987654321:root", "210987654321", "arn:aws:iam::210987654321:*"]
)
def test_a_whole_account_is_never_the_support_principal(principal: str) -> None:
    with pytest.raises(Refused, match="name a role or user"):
        trust_policy(principal, UNTIL, external_id("acme-prod"))
