"""Semantic version parsing and precedence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.versions import SemVer, version_problem


@pytest.mark.parametrize(
    "text", ["", "2026.11", "2026.11.3.1", "v1.2.3", "01.2.3", "1.2.3-", "1.2.3-01", None]
)
def test_not_semantic_versions(text: str | None) -> None:
    assert SemVer.parse(text) is None


def test_precedence_follows_semver() -> None:
    ordered = [
        "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "2026.11.3", "2026.11.10", "2026.12.0",
    ]  # fmt: skip
    parsed = [SemVer.parse(v) for v in ordered]
    assert all(p is not None for p in parsed)
    assert parsed == sorted(parsed)  # type: ignore[type-var]
    assert SemVer.parse("1.2.3+build.5") == SemVer.parse("1.2.3")
    assert version_problem("2026.11") is not None and version_problem("2026.11.3") is None


@given(st.tuples(*(st.integers(0, 10_000) for _ in range(3))),
       st.tuples(*(st.integers(0, 10_000) for _ in range(3))))  # fmt: skip
def test_release_cores_order_like_tuples(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    va, vb = SemVer.parse(".".join(map(str, a))), SemVer.parse(".".join(map(str, b)))
    assert va is not None and vb is not None
    assert (va < vb) == (a < b) and (va == vb) == (a == b)
