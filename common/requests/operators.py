"""Operators: each a broker user of their own (``op-<name>``) with a role (common/operators.py).
The registry keeps them; only an admin may change them."""

from __future__ import annotations

from pydantic import AwareDatetime, Field, field_validator

from common.operators import operator_user
from common.requests import Request, Response, rpc
from common.vocabulary import Role


class OperatorView(Response):
    name: str  # the broker user, op-<name>
    role: Role
    added_at: AwareDatetime
    added_by: str


class AddedOperator(OperatorView):
    # Shown once: the registry keeps no copy.
    password: str


class _Named(Request[OperatorView]):
    name: str = Field(max_length=64)

    @field_validator("name")
    @classmethod
    def _user(cls, value: str) -> str:
        return operator_user(value)


@rpc("registry", "operators.add", role="admin")
class OperatorsAdd(Request[AddedOperator]):
    """A broker user for a person, with a role; the password is in the answer only."""

    name: str = Field(max_length=64)
    role: Role

    @field_validator("name")
    @classmethod
    def _user(cls, value: str) -> str:
        return operator_user(value)


@rpc("registry", "operators.list", read_only=True)
class OperatorsList(Request[list[OperatorView]]):
    pass


@rpc("registry", "operators.set_role", role="admin")
class OperatorsSetRole(_Named):
    role: Role


@rpc("registry", "operators.remove", role="admin")
class OperatorsRemove(_Named):
    """Delete the broker user (the broker closes its connections) and the role."""
