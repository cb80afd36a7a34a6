"""The cell's CloudFormation template: lint-clean, and its parameters are exactly what
`substratectl cells create` hands the customer."""

from __future__ import annotations

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


def test_template_is_lint_clean() -> None:
    lint = Path(sys.executable).parent / "cfn-lint"
    done = subprocess.run(
        [str(lint), str(TEMPLATE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_create_supplies_every_parameter_without_a_default() -> None:
    template = yaml.load(TEMPLATE.read_text(), Loader=_Loader)
    declared = template["Parameters"]
    required = {name for name, spec in declared.items() if "Default" not in spec}
    cell = CellsCreate(id="acme", stage="dedicated", region="eu-west-1", org="acme")
    params = stack_parameters(cell, "amqp://acme:secretsecretsecret@h:5672/", "svc")
    assert required <= set(params) <= set(declared)
    assert "TemplateVersion" in template["Outputs"]
