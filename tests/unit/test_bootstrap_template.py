"""The cell's CloudFormation template: lint-clean, and its parameters are exactly what
`substratectl cells create` hands the customer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from common.requests.registry import CellsCreate
from services.registry.model import stack_parameters

TEMPLATE = Path(__file__).resolve().parents[2] / "cell_agent" / "bootstrap" / "cell.yaml"


class _Loader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub, ...) as plain values."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_Loader.add_multi_constructor("!", _tag)


V1 = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "cell-v1.yaml"


def test_both_template_versions_are_lint_clean() -> None:
    lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(
        [str(lint), str(TEMPLATE), str(V1)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_current_template_is_the_next_version_with_the_support_principal() -> None:
    current = yaml.load(TEMPLATE.read_text(), Loader=_Loader)
    first = yaml.load(V1.read_text(), Loader=_Loader)
    assert first["Outputs"]["TemplateVersion"]["Value"] == "1"
    assert current["Outputs"]["TemplateVersion"]["Value"] == "3"
    assert "SupportPrincipal" in current["Parameters"]
    assert "Default" in current["Parameters"]["SupportPrincipal"], "an update needs no new input"
    statements = current["Resources"]["AgentRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]["Statement"]  # fmt: skip
    iam = [s for s in statements if any(str(a).startswith("iam:") for a in
                                        ([s["Action"]] if isinstance(s["Action"], str)
                                         else s["Action"]))]  # fmt: skip
    scoped = [s for s in iam if s["Resource"] != "*"]
    assert all("role/substrate-debug/*" in str(s["Resource"]) for s in scoped)
    attach = [s for s in iam if s["Action"] == "iam:AttachRolePolicy"]
    assert "ReadOnlyAccess" in str(attach[0]["Condition"]), "only the read-only policy"
    assert [s["Action"] for s in iam if s["Resource"] == "*"] == ["iam:ListRoles"]


def test_the_agent_and_the_debug_role_get_no_more_than_they_need() -> None:
    """AMQPS only to the endpoint; the support principal a role or user, never an account;
    debug roles created only with ReadOnlyAccess as their boundary; images read from the
    product's repositories only."""
    current = yaml.load(TEMPLATE.read_text(), Loader=_Loader)
    (ingress,) = current["Resources"]["EndpointSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert (ingress["FromPort"], ingress["ToPort"]) == (5671, 5671)
    pattern = re.compile(current["Parameters"]["SupportPrincipal"]["AllowedPattern"])
    assert pattern.match("arn:aws:iam::210987654321:role/substrate-support")
    assert not pattern.match("arn:aws:iam::210987654321:root")
    statements = current["Resources"]["AgentRole"]["Properties"]["Policies"][0][
        "PolicyDocument"]["Statement"]  # fmt: skip
    (create,) = [s for s in statements if s["Action"] == "iam:CreateRole"]
    assert "ReadOnlyAccess" in str(create["Condition"]["StringEquals"]["iam:PermissionsBoundary"])
    reads = [s for s in statements if "ecr:BatchGetImage" in s["Action"]]
    assert [s["Resource"] for s in reads] == ["ProductRepositories"]
    anywhere = [s["Action"] for s in statements if s["Resource"] == "*"]
    assert anywhere == ["ecr:GetAuthorizationToken", "iam:ListRoles"]


def test_create_supplies_every_parameter_without_a_default() -> None:
    template = yaml.load(TEMPLATE.read_text(), Loader=_Loader)
    declared = template["Parameters"]
    required = {name for name, spec in declared.items() if "Default" not in spec}
    cell = CellsCreate(id="acme", stage="dedicated", region="eu-west-1", org="acme")
    params = stack_parameters(cell, "amqp://acme:secretsecretsecret@h:5672/", "svc", "PEM")
    assert required <= set(params) <= set(declared)
    assert "ControlPlaneCaCertificate" in params
    assert "TemplateVersion" in template["Outputs"]
