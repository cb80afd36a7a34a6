"""Health checks inside the cell (common/health.py): running each kind, and judging a release
over its bake and watch. Only the verdict leaves the cell: healthy, unhealthy (which check,
what it saw against what it wanted) or inconclusive; never a metric series.

A check's observation is ``pass``, ``fail`` or ``no_data`` (no answer in time, an empty query
result), and no data counts as the check declares. A failure counts once it has lasted the
check's ``for_seconds`` without a pass in between (at once for 0). The bake ends early with
``unhealthy`` at the first failure that counts; at its end a check whose last observation was
inconclusive, or whose failure has not lasted long enough to count, makes the verdict
inconclusive; otherwise it is healthy. The watch after a healthy bake looks only for a
failure that counts.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common.health import (
    COMPARE,
    CommandCheck,
    HttpCheck,
    PrometheusCheck,
    Verdict,
    parse_check,
)

Outcome = Literal["pass", "fail", "no_data"]
# What an answer's body may be read up to: a probe never reads a large page whole.
BODY_LIMIT = 1 << 20


@dataclass(frozen=True)
class Observation:
    check: str
    outcome: Outcome
    # What it saw, against what it wanted, in words (the evidence a verdict carries).
    seen: str


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    check: str | None = None
    evidence: str | None = None


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "substrate-cell-agent"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return int(answer.status), answer.read(BODY_LIMIT)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read(BODY_LIMIT) if exc.fp is not None else b""


async def _http(check: HttpCheck) -> Observation:
    try:
        status, body = await asyncio.wait_for(
            asyncio.to_thread(_get, check.url, check.timeout_seconds), check.timeout_seconds + 1
        )
    except (OSError, TimeoutError, ValueError) as exc:
        return Observation(check.name, "no_data", f"no answer from {check.url} ({exc})")
    if status != check.status:
        return Observation(check.name, "fail", f"status {status}, wants {check.status}")
    if check.body_contains is not None and check.body_contains.encode() not in body:
        return Observation(
            check.name, "fail", f"status {status} without {check.body_contains!r} in the body"
        )
    return Observation(check.name, "pass", f"status {status}")


async def _command(check: CommandCheck) -> Observation:
    try:
        process = await asyncio.create_subprocess_exec(
            *check.command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        return Observation(check.name, "fail", f"could not run {check.command[0]!r}: {exc}")
    try:
        code = await asyncio.wait_for(process.wait(), check.timeout_seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        return Observation(check.name, "no_data", f"still running after {check.timeout_seconds:g}s")
    if code != check.exit_code:
        return Observation(check.name, "fail", f"exit code {code}, wants {check.exit_code}")
    return Observation(check.name, "pass", f"exit code {code}")


def _samples(answer: dict[str, Any]) -> list[float]:
    """An instant query's values (a vector's samples, or a scalar)."""
    data = answer.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar" and isinstance(result, list):
        return [float(result[1])]
    return [float(sample["value"][1]) for sample in result or ()]


async def _prometheus(check: PrometheusCheck) -> Observation:
    url = check.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": check.query})
    try:
        status, body = await asyncio.wait_for(
            asyncio.to_thread(_get, url, check.timeout_seconds), check.timeout_seconds + 1
        )
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            return Observation(check.name, "no_data", f"query failed: status {status}")
        values = _samples(answer)
    except (OSError, TimeoutError, ValueError, KeyError, TypeError, IndexError) as exc:
        return Observation(check.name, "no_data", f"no answer from {check.url} ({exc})")
    if not values:
        return Observation(check.name, "no_data", "the query returned no sample")
    compare = COMPARE[check.comparison]
    # The sample furthest on the wrong side is the evidence.
    bad = [v for v in values if not compare(v, check.threshold)]
    wants = f"wants {check.comparison} {check.threshold:g}"
    if bad:
        worst = max(bad) if check.comparison in ("<", "<=") else min(bad)
        return Observation(check.name, "fail", f"observed {worst:g}, {wants}")
    return Observation(check.name, "pass", f"observed {values[0]:g}, {wants}")


async def observe(raw: dict[str, Any]) -> tuple[Observation, str]:
    """One check's observation, and what its no data counts as."""
    try:
        check = parse_check(raw)
    except ValueError as exc:
        # A kind of check (or a field) from a newer control plane: this agent cannot judge it.
        name = str(raw.get("name", "?"))
        return Observation(name, "no_data", f"this agent cannot run it: {exc}"), "inconclusive"
    if isinstance(check, HttpCheck):
        return await _http(check), check.no_data
    if isinstance(check, CommandCheck):
        return await _command(check), check.no_data
    return await _prometheus(check), check.no_data


@dataclass
class _Track:
    for_seconds: float
    failing_since: float | None = None
    last: Literal["pass", "fail", "inconclusive"] | None = None
    seen: str = ""


@dataclass
class Judge:
    """A release's checks judged over time (``now`` in seconds, any monotonic origin)."""

    checks: Sequence[dict[str, Any]]
    # The desired state's generation it judges.
    generation: int = -1
    tracks: dict[str, _Track] = field(default_factory=dict)

    async def look(self, now: float) -> Judgement | None:
        """Observe every check once; an ``unhealthy`` judgement as soon as one counts."""
        observed = await asyncio.gather(*(observe(raw) for raw in self.checks))
        for raw, (obs, no_data) in zip(self.checks, observed, strict=True):
            track = self.tracks.setdefault(
                obs.check, _Track(for_seconds=float(raw.get("for_seconds", 0) or 0))
            )
            outcome = obs.outcome if obs.outcome != "no_data" else no_data
            track.seen = obs.seen if obs.outcome != "no_data" else f"no data: {obs.seen}"
            if outcome == "fail":
                if track.failing_since is None:
                    track.failing_since = now
                track.last = "fail"
            else:
                track.failing_since = None
                track.last = "pass" if outcome == "pass" else "inconclusive"
        return self.failure(now)

    def failure(self, now: float) -> Judgement | None:
        for name, track in self.tracks.items():
            if track.failing_since is not None and now - track.failing_since >= track.for_seconds:
                return Judgement("unhealthy", name, track.seen)
        return None

    def at_end(self, now: float) -> Judgement:
        """The bake's verdict at its end."""
        failed = self.failure(now)
        if failed is not None:
            return failed
        for name, track in self.tracks.items():
            if track.last == "inconclusive":
                return Judgement("inconclusive", name, track.seen)
            if track.last == "fail":
                return Judgement(
                    "inconclusive",
                    name,
                    f"failing for less than its {track.for_seconds:g}s: {track.seen}",
                )
        return Judgement("healthy")
