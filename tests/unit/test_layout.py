"""The rules of the house that a grep can break: what imports the messaging library, what
imports test modules, how long a product module grows."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "services", "cell_agent", "substratectl", "deploy", "observability")
# "Modules of a few hundred lines": a module past this has grown two subjects.
MAX_PRODUCT_LINES = 560


def _python_files(*tops: str) -> Iterator[Path]:
    for top in tops:
        yield from sorted((ROOT / top).rglob("*.py"))


def _imported(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_only_the_bus_imports_the_messaging_library() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _python_files(*PRODUCT)
        if not path.is_relative_to(ROOT / "common" / "bus")
        for name in _imported(path)
        if name.split(".")[0] in {"aio_pika", "aiormq", "pamqp"}
    ]
    assert offenders == []


def test_handlers_and_decisions_import_without_the_messaging_library() -> None:
    """Handlers raise the bus's errors and write through stores; none of that needs aio-pika
    (STYLE rule 1). Imported in a process where aio-pika cannot be imported."""
    modules = [
        "common.bus.errors",
        *(
            ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for path in _python_files("services")
            if path.stem in {"handlers", "model", "store", "transitions"}
            or path.parent.name == "model"
        ),
    ]
    script = (
        "import importlib, sys\n"
        "sys.modules.update(aio_pika=None, aiormq=None)\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(modules) > 10, modules


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    """Shared test code is the testing package (STYLE rule 11), never a test file."""
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _python_files(*PRODUCT, "bench", "testing", "tests", "scripts")
        for name in _imported(path)
        if name.startswith("tests.")
        and any(part.startswith("test_") or part == "conftest" for part in name.split("."))
    ]
    assert offenders == []


def test_product_modules_stay_small() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _python_files(*PRODUCT)
        if (lines := len(path.read_text().splitlines())) > MAX_PRODUCT_LINES
    }
    assert long == {}
