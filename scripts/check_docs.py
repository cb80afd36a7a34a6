"""Checks that what the docs point at exists (make lint runs it).

- every relative link in README.md and docs/*.md names a file of the repository, and a heading
  of it where the link has an anchor;
- every pytest node id written as code (`tests/x.py::test_name`) names a test that is defined;
- every code span that names a path of the repository (`common/bus/consume.py`) names one that
  exists;
- every promise in docs/guarantees.md names at least one test.

Prints each problem as FILE:LINE: what, and exits 1 if there is any.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = (
    "tests/",
    "testing/",
    "common/",
    "services/",
    "cell_agent/",
    "substratectl/",
    "bench/",
    "scripts/",
    "docs/",
    "compose/",
    "deploy/",
    "observability/",
    ".ci/",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
NODE = re.compile(r"^([\w./-]+\.py)::(\w+)(\[[^\]]*\])?$")


def slug(heading: str) -> str:
    """The anchor a markdown heading gets (GitHub's rule)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {slug(line.lstrip("#")) for line in lines if line.startswith("#")}


def defines(path: Path, name: str) -> bool:
    source = path.read_text()
    return re.search(rf"^(async )?def {name}\(|^{name} = ", source, re.MULTILINE) is not None


def check(doc: Path) -> list[str]:
    problems = []
    where = doc.relative_to(ROOT)
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                problems.append(f"{where}:{number}: link to a missing file: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}:{number}: link to a missing heading: {target}")
        for span in CODE.findall(line):
            node = NODE.match(span)
            if node:
                path = ROOT / node.group(1)
                if not path.exists():
                    problems.append(f"{where}:{number}: test file missing: {span}")
                elif not defines(path, node.group(2)):
                    problems.append(f"{where}:{number}: no such test: {span}")
            elif (
                span.startswith(TOP)
                and re.fullmatch(r"[\w./-]+", span)
                and not (ROOT / span).exists()
            ):
                problems.append(f"{where}:{number}: no such path: {span}")
    return problems


def promises_without_tests(doc: Path) -> list[str]:
    problems = []
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| **")]
    for row in rows:
        proved_by = row.rstrip("|").rsplit("|", 1)[-1]
        if not any(NODE.match(span) for span in CODE.findall(proved_by)):
            promise = row.split("**")[1]
            problems.append(f"{doc.relative_to(ROOT)}: no test proves: {promise}")
    return problems


def main() -> int:
    problems = [problem for doc in DOCS for problem in check(doc)]
    problems += promises_without_tests(ROOT / "docs" / "guarantees.md")
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problems in the docs' references", file=sys.stderr)
        return 1
    print(f"docs: every link, path and test named in {len(DOCS)} files exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
