"""The agent's flag answers over HTTP, on loopback only, for the applications in the cell.

Two shapes of the same local evaluation:

- ``GET /flags/KEY`` (and ``GET /flags`` for every flag): the flags service's own JSON answer,
  as ``substratectl flags eval`` prints it.
- OFREP, the OpenFeature Remote Evaluation Protocol, so application code uses a standard
  OpenFeature SDK (``cell_agent/openfeature_provider.py`` for Python):
  ``POST /ofrep/v1/evaluate/flags/KEY`` (one flag), ``POST /ofrep/v1/evaluate/flags`` (all of
  them, with an ETag so a polling client is answered 304 while nothing changed) and
  ``GET /ofrep/v1/configuration``.

Flags here target cells, not users: the answer depends on the cell's attributes (from the
control plane, and the installed release the agent knows), so an OFREP request's evaluation
context is read (it must be a JSON object, as the protocol says) but changes nothing. The
reason is the engine's own (``RULE_MATCH``, ``VERSION_GATE``, ``SPLIT``, ``DEFAULT``,
``DISABLED``): OpenFeature allows any reason string, and the same word then reads the same in
``flags eval``, here and in the agent's metrics.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from cell_agent.flags import LocalFlags
from common.flags import Evaluation
from common.metrics import Response

FLAG_EVALUATIONS = Counter(
    "cell_agent_flag_evaluations", "Local flag evaluations by flag and reason", ["flag", "reason"]
)
OFREP = "/ofrep/v1"


def _counted(answer: Evaluation) -> Evaluation:
    # An unknown key is not a label value: anyone in the cell could mint series with it.
    known = answer.reason != "FLAG_NOT_FOUND"
    FLAG_EVALUATIONS.labels(answer.key if known else "(unknown)", answer.reason).inc()
    return answer


def _success(answer: Evaluation) -> dict[str, Any]:
    metadata: dict[str, Any] = {"snapshotVersion": answer.snapshot_version}
    if answer.rule is not None:
        metadata["rule"] = answer.rule
        metadata["ruleName"] = answer.rule_name or ""
    out: dict[str, Any] = {"key": answer.key, "reason": answer.reason, "metadata": metadata}
    if answer.variant is not None:
        out["variant"] = answer.variant
    # No value (a variant without one) tells the client to use its code default (OFREP ADR 6).
    if answer.value is not None:
        out["value"] = answer.value
    return out


def _not_found(key: str) -> dict[str, Any]:
    return {
        "key": key,
        "errorCode": "FLAG_NOT_FOUND",
        "errorDetails": f"no flag {key!r} in this cell's snapshot",
    }


async def _context(request: web.Request) -> str | None:
    """None for a body OFREP accepts (none, or an object whose ``context`` is an object), else
    what is wrong with it."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "the body is not JSON"
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if not isinstance(body.get("context", {}), dict):
        return "context is not a JSON object"
    return None


class FlagRoutes:
    def __init__(self, flags: LocalFlags) -> None:
        self.flags = flags

    async def flags_route(self, tail: str) -> Response:
        """``GET /flags/KEY``: one answer; ``GET /flags``: every flag's, by key."""
        key = tail.strip("/")
        if not key:
            keys = sorted(self.flags.snapshot.flags)
            return Response.json(
                200, {"flags": [_counted(self.flags.evaluate(k)).as_json() for k in keys]}
            )
        return Response.json(200, _counted(self.flags.evaluate(key)).as_json())

    async def evaluate_one(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        problem = await _context(request)
        if problem is not None:
            body = {"key": key, "errorCode": "PARSE_ERROR", "errorDetails": problem}
            return web.json_response(body, status=400)
        answer = _counted(self.flags.evaluate(key))
        if answer.reason == "FLAG_NOT_FOUND":
            return web.json_response(_not_found(key), status=404)
        return web.json_response(_success(answer))

    async def evaluate_all(self, request: web.Request) -> web.StreamResponse:
        problem = await _context(request)
        if problem is not None:
            return web.json_response(
                {"errorCode": "PARSE_ERROR", "errorDetails": problem}, status=400
            )
        keys = sorted(self.flags.snapshot.flags)
        body = json.dumps(
            {"flags": [_success(_counted(self.flags.evaluate(k))) for k in keys]},
            sort_keys=True,
        ).encode()
        # The answer itself is the tag: it changes with the snapshot and with the cell's
        # installed release (which version gates read), and with nothing else.
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, headers={"ETag": etag, "Content-Type": "application/json"})

    async def configuration(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "name": "substrate-cell-agent",
                "capabilities": {
                    "cacheInvalidation": {
                        "polling": {"enabled": True, "minPollingIntervalMs": 1000}
                    },
                    "flagEvaluation": {
                        "supportedTypes": ["boolean", "string", "int", "float", "object"]
                    },
                },
            }
        )

    def ofrep(self) -> list[web.RouteDef]:
        return [
            web.post(f"{OFREP}/evaluate/flags/{{key}}", self.evaluate_one),
            web.post(f"{OFREP}/evaluate/flags", self.evaluate_all),
            web.get(f"{OFREP}/configuration", self.configuration),
        ]
