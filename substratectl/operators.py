"""`substratectl operators ...`: the people who may operate the fleet, each a broker user of
their own with a role (viewer, operator or admin)."""

from __future__ import annotations

import argparse

from common import broker_urls
from common.requests.operators import (
    AddedOperator,
    OperatorsAdd,
    OperatorsList,
    OperatorsRemove,
    OperatorsSetRole,
    OperatorView,
)
from common.vocabulary import ROLES
from substratectl.context import Ctl
from substratectl.output import table

COLUMNS = ["name", "role", "added_at", "added_by"]


async def add(ctl: Ctl) -> int:
    a = ctl.args

    def added(result: AddedOperator) -> str:
        url = broker_urls.with_credentials(ctl.settings.amqp_url, result.name, result.password)
        return (
            f"operator {result.name} added as {result.role}; the password is shown only now:\n"
            f"export SUBSTRATE_AMQP_URL={url}"
        )

    return await ctl.ask(OperatorsAdd(name=a.name, role=a.role), added)


async def list_operators(ctl: Ctl) -> int:
    return await ctl.ask(OperatorsList(), lambda ops: table(ops, COLUMNS))


async def set_role(ctl: Ctl) -> int:
    def changed(result: OperatorView) -> str:
        return f"operator {result.name} is now {result.role}"

    return await ctl.ask(OperatorsSetRole(name=ctl.args.name, role=ctl.args.role), changed)


async def remove(ctl: Ctl) -> int:
    def removed(result: OperatorView) -> str:
        return f"operator {result.name} removed; their broker user and connections are gone"

    return await ctl.ask(OperatorsRemove(name=ctl.args.name), removed)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ops = sub.add_parser("operators", help="who may operate the fleet, and their roles")
    cmds = ops.add_subparsers(dest="operators_command", required=True, metavar="ACTION")
    p = cmds.add_parser("add", help="a broker user for a person, with a role (admin only)")
    p.add_argument("name", help="alice or op-alice: the broker user is op-<name>")
    p.add_argument("--role", required=True, choices=ROLES)
    p.set_defaults(run=add)
    p = cmds.add_parser("list", help="every operator and their role")
    p.set_defaults(run=list_operators)
    p = cmds.add_parser("set-role", help="change an operator's role (admin only)")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    p.set_defaults(run=set_role)
    p = cmds.add_parser("remove", help="delete an operator's broker user (admin only)")
    p.add_argument("name")
    p.set_defaults(run=remove)
