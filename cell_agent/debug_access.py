"""Emergency debug access, opened only by the customer.

A grant is an IAM role in the cell's own account, under the path ``/substrate-debug/``, that
only the vendor's support principal (a role or user, never a whole account) may assume, with
the cell's external id (``substrate:<cell id>``: the vendor acting for another customer cannot
be talked into assuming it), read-only (``ReadOnlyAccess``, also its permissions boundary),
until a time written into its trust policy (``aws:CurrentTime``): AWS itself refuses it
afterwards. The agent
also deletes it when it expires (checked at start and then periodically, so also after a
restart), and the customer can revoke it at any time. Nothing the control plane sends can
create or extend one: there is no message for it, and the cell's template lets the agent's role
manage only roles under that path with that policy.

Grants, revocations and expiries are reported to the control plane, which keeps them as the
cell's audit trail; a report made while the control plane is away waits in CELL_STATE_DIR.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import boto3
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from mypy_boto3_iam import IAMClient

PATH = "/substrate-debug/"
POLICY = "arn:aws:iam::aws:policy/ReadOnlyAccess"
EXPIRES_TAG = "substrate:expires-at"
REASON_TAG = "substrate:reason"
GRANTED_BY_TAG = "substrate:granted-by"
_LONG_AGO = datetime.min.replace(tzinfo=UTC)
# AWS caps a tag value at 256 characters.
MAX_REASON = 256


class Refused(Exception):
    """A grant that must not be made; the message says why."""


@dataclass(frozen=True)
class Grant:
    role_name: str
    role_arn: str
    expires_at: datetime
    reason: str
    granted_by: str

    @property
    def expired(self) -> bool:
        return self.expires_at <= datetime.now(UTC)


def external_id(cell_id: str) -> str:
    """What the vendor's support principal must present to assume the cell's debug role: unique
    to the cell and chosen by the vendor (the cell id), so a request made for another customer
    cannot be turned against this one (the confused deputy)."""
    return f"substrate:{cell_id}"


def check_principal(principal: str) -> str:
    """A role or user: a whole account (``:root``) would let anyone in it assume the role."""
    if principal.endswith(":root") or (":role/" not in principal and ":user/" not in principal):
        raise Refused(f"support principal {principal!r}: name a role or user, not an account")
    return principal


def trust_policy(principal: str, expires_at: datetime, external: str) -> dict[str, object]:
    """Only ``principal`` may assume the role, presenting ``external``, until ``expires_at``."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": check_principal(principal)},
                "Action": "sts:AssumeRole",
                "Condition": {
                    "DateLessThan": {"aws:CurrentTime": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")},
                    "StringEquals": {"sts:ExternalId": external},
                },
            }
        ],
    }


def check_grant(hours: float, reason: str, max_hours: float) -> str:
    """The reason as it will be kept, or Refused naming the problem."""
    if not 0 < hours <= max_hours:
        raise Refused(f"--hours: {hours:g} is not between 0 and the cap of {max_hours:g} hours")
    reason = " ".join(reason.split())
    if not reason:
        raise Refused("--reason: say why access is opened (it is kept in the audit trail)")
    if len(reason) > MAX_REASON:
        raise Refused(f"--reason: at most {MAX_REASON} characters, not {len(reason)}")
    return reason


def _expiry(tag: str | None) -> datetime:
    """A role without a readable expiry was not made here; it counts as long expired (a role
    under the path is debug access, and debug access never lasts)."""
    try:
        when = datetime.fromisoformat(tag) if tag else _LONG_AGO
    except ValueError:
        return _LONG_AGO
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class DebugAccess:
    """The cell's debug roles, through IAM with the caller's credentials."""

    def __init__(self, region: str) -> None:
        self._iam: IAMClient = boto3.client("iam", region_name=region)

    def grant(
        self,
        principal: str,
        hours: float,
        reason: str,
        granted_by: str,
        *,
        max_hours: float,
        external: str,
    ) -> Grant:
        reason = check_grant(hours, reason, max_hours)
        now = datetime.now(UTC).replace(microsecond=0)
        expires_at = now + timedelta(hours=hours)
        name = f"substrate-debug-{now:%Y%m%d%H%M%S}-{secrets.token_hex(3)}"
        role = self._iam.create_role(
            Path=PATH,
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(trust_policy(principal, expires_at, external)),
            # The most the role can ever do, whatever is attached to it later: the template lets
            # the agent's role create only roles with this boundary.
            PermissionsBoundary=POLICY,
            Description=f"Substrate support, read-only, until {expires_at.isoformat()}",
            MaxSessionDuration=3600,
            Tags=[
                {"Key": EXPIRES_TAG, "Value": expires_at.isoformat()},
                {"Key": REASON_TAG, "Value": reason},
                {"Key": GRANTED_BY_TAG, "Value": granted_by[:256]},
            ],
        )["Role"]
        try:
            self._iam.attach_role_policy(RoleName=name, PolicyArn=POLICY)
        except ClientError:
            # Nothing half-made: a role without its policy is not left behind.
            self._iam.delete_role(RoleName=name)
            raise
        return Grant(name, role["Arn"], expires_at, reason, granted_by)

    def grants(self) -> list[Grant]:
        found = []
        pages = self._iam.get_paginator("list_roles").paginate(PathPrefix=PATH)
        for page in pages:
            for role in page["Roles"]:
                tags = {
                    t["Key"]: t["Value"]
                    for t in self._iam.list_role_tags(RoleName=role["RoleName"])["Tags"]
                }
                when = _expiry(tags.get(EXPIRES_TAG))
                reason, by = tags.get(REASON_TAG, ""), tags.get(GRANTED_BY_TAG, "")
                found.append(Grant(role["RoleName"], role["Arn"], when, reason, by))
        return sorted(found, key=lambda g: g.expires_at)

    def revoke(self, grant: Grant) -> None:
        for attached in self._iam.list_attached_role_policies(RoleName=grant.role_name)[
            "AttachedPolicies"
        ]:
            self._iam.detach_role_policy(RoleName=grant.role_name, PolicyArn=attached["PolicyArn"])
        self._iam.delete_role(RoleName=grant.role_name)

    def expire(self) -> list[Grant]:
        """Delete every grant past its time; the ones deleted."""
        gone = [g for g in self.grants() if g.expired]
        for grant in gone:
            self.revoke(grant)
        return gone
