"""Health checks: what a release (or the rollout policy, as a default) asks a cell to look at
after applying it, during its bake and its watch, and the verdict that is all that leaves
the cell.

The checks run inside the cell (``cell_agent/health.py``); the control plane never sees a
metric series, only ``healthy``, ``unhealthy`` (which check, what it saw against what it
wanted) or ``inconclusive``. The release file and the policy validate every check with these
models; on the wire a check travels as a plain mapping (as flags do), so an agent that does not
know a newer kind of check says so in an ``inconclusive`` verdict instead of refusing the
desired state that carries it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

# What a check's "no data" (no sample, no answer in time) counts as.
NoData = Literal["fail", "pass", "inconclusive"]
Verdict = Literal["healthy", "unhealthy", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("healthy", "unhealthy", "inconclusive")
Comparison = Literal["<", "<=", ">", ">=", "==", "!="]
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

_Url = Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
_Seconds = Annotated[float, Field(ge=0, le=7 * 86400)]


class _Check(BaseModel):
    # forbid: a misspelt key (``treshold``) must be an error, not a default.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
    timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    no_data: NoData = "fail"
    # How long a breach must last before it counts (as an alert rule's ``for``): 0, at once.
    for_seconds: _Seconds = 0.0


class HttpCheck(_Check):
    """GET ``url`` from inside the cell: healthy when it answers ``status`` (and, if given,
    its body contains ``body_contains``). No answer within the timeout is no data."""

    type: Literal["http"]
    url: _Url
    status: int = Field(default=200, ge=100, le=599)
    body_contains: str | None = Field(default=None, min_length=1, max_length=1000)


class CommandCheck(_Check):
    """Run ``command`` (an argument list, no shell) inside the cell: healthy when it exits
    with ``exit_code``. Killed at the timeout, it is no data."""

    type: Literal["command"]
    command: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=64)
    exit_code: int = Field(default=0, ge=0, le=255)


class PrometheusCheck(_Check):
    """An instant ``query`` against a Prometheus-compatible endpoint inside the cell (``url``,
    its base, as ``http://prometheus:9090``): healthy while every sample ``comparison``
    ``threshold`` holds. An empty result, or no answer, is no data."""

    type: Literal["prometheus"]
    url: _Url
    query: str = Field(min_length=1, max_length=4000)
    comparison: Comparison
    threshold: float = Field(allow_inf_nan=False)


Check = Annotated[HttpCheck | CommandCheck | PrometheusCheck, Field(discriminator="type")]
_CHECK: TypeAdapter[HttpCheck | CommandCheck | PrometheusCheck] = TypeAdapter(Check)


def parse_check(raw: dict[str, Any]) -> HttpCheck | CommandCheck | PrometheusCheck:
    """A check as the wire carries it; ValueError names what this agent cannot run."""
    try:
        return _CHECK.validate_python(raw)
    except ValidationError as exc:
        name = raw.get("name", "?") if isinstance(raw, dict) else "?"
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"check {name}: {where}: {first['msg']}") from None


def _unique(checks: Sequence[_Check]) -> None:
    names = [c.name for c in checks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"check names must be unique; repeated: {', '.join(repeated)}")


class HealthFile(BaseModel):
    """A release's ``health``: its checks, and how long they run (None: the stage's default
    from the rollout policy)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checks: list[Check] = Field(default_factory=list, max_length=32)
    bake_seconds: _Seconds | None = None
    watch_seconds: _Seconds | None = None
    interval_seconds: float = Field(default=10.0, gt=0, le=3600)

    @field_validator("checks")
    @classmethod
    def _unique_names(cls, checks: list[Check]) -> list[Check]:
        _unique(checks)
        return checks

    def wire(self) -> ReleaseHealth:
        return ReleaseHealth(
            checks=tuple(c.model_dump(exclude_none=True) for c in self.checks),
            bake_seconds=self.bake_seconds,
            watch_seconds=self.watch_seconds,
            interval_seconds=self.interval_seconds,
        )


class ReleaseHealth(BaseModel):
    """A release's health as published and carried by events (checks as mappings)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    checks: tuple[dict[str, Any], ...] = ()
    bake_seconds: float | None = None
    watch_seconds: float | None = None
    interval_seconds: float = 10.0


class HealthSpec(BaseModel):
    """What a desired state asks the agent to check after applying it, resolved from the
    release and the policy: the checks, the bake (a verdict at its end, or at the first
    lasting breach) and the watch after it (a lasting breach still turns the verdict)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    checks: tuple[dict[str, Any], ...] = Field(min_length=1)
    bake_seconds: float = 0.0
    watch_seconds: float = 0.0
    interval_seconds: float = 10.0


def resolve(
    release: ReleaseHealth | None,
    default_checks: Sequence[dict[str, Any]],
    *,
    bake_seconds: float,
    watch_seconds: float,
) -> HealthSpec | None:
    """The spec a desired state carries: the release's checks (or the policy's when it names
    none) with its own bake and watch (or the stage's). None: nothing to check."""
    checks = tuple(release.checks if release and release.checks else default_checks)
    if not checks:
        return None
    bake = release.bake_seconds if release and release.bake_seconds is not None else bake_seconds
    watch = (
        release.watch_seconds if release and release.watch_seconds is not None else watch_seconds
    )
    return HealthSpec(
        checks=checks,
        bake_seconds=bake,
        watch_seconds=watch,
        interval_seconds=release.interval_seconds if release else 10.0,
    )
