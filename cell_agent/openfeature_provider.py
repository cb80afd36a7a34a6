"""An OpenFeature provider for Python applications running in a cell: it asks the cell's agent
over OFREP on loopback (``cell_agent/ofrep.py``), so application code uses the standard SDK::

    from openfeature import api
    from cell_agent.openfeature_provider import SubstrateProvider

    api.set_provider(SubstrateProvider("http://127.0.0.1:9180"))
    if api.get_client().get_boolean_value("new-editor", False):
        ...

Needs ``openfeature-sdk`` (the project's ``openfeature`` extra). Every evaluation is one local
HTTP request to the agent, which evaluates from the snapshot it keeps on disk: the answer holds
while the control plane is unreachable, and an agent that does not answer gives the code's
default with the reason ``ERROR`` (the SDK's rule for a failed evaluation).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

T = TypeVar("T")
Object = Sequence[FlagValueType] | Mapping[str, FlagValueType]


def _context(context: EvaluationContext | None) -> dict[str, Any]:
    if context is None:
        return {}
    out = dict(context.attributes)
    if context.targeting_key is not None:
        out["targetingKey"] = context.targeting_key
    return out


class SubstrateProvider(AbstractProvider):
    def __init__(self, agent_url: str = "http://127.0.0.1:9180", timeout: float = 1.0) -> None:
        self.base = agent_url.rstrip("/")
        self.timeout = timeout

    def get_metadata(self) -> Metadata:
        return Metadata(name="substrate-cell-agent")

    def _ask(self, key: str, context: EvaluationContext | None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.base}/ofrep/v1/evaluate/flags/{urllib.parse.quote(key, safe='')}",
            data=json.dumps({"context": _context(context)}, default=str).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return int(answer.status), dict(json.load(answer))
        except urllib.error.HTTPError as exc:
            try:
                return int(exc.code), dict(json.load(exc))
            except ValueError:
                return int(exc.code), {}

    def _resolve(
        self,
        key: str,
        default: T,
        kinds: tuple[type, ...],
        context: EvaluationContext | None,
    ) -> FlagResolutionDetails[T]:
        try:
            status, body = self._ask(key, context)
        except (OSError, ValueError) as exc:
            detail = f"the cell agent at {self.base} did not answer: {exc}"
            return FlagResolutionDetails(default, ErrorCode.GENERAL, detail, Reason.ERROR)
        if status != 200:
            code = body.get("errorCode", "GENERAL")
            known = code if code in ErrorCode.__members__ else "GENERAL"
            detail = str(body.get("errorDetails") or f"status {status}")
            return FlagResolutionDetails(default, ErrorCode[known], detail, Reason.ERROR)
        metadata = body.get("metadata") or {}
        if "value" not in body:
            # The flag's variant has no value: the code's default stands (OFREP ADR 6).
            return FlagResolutionDetails(
                default, reason=body.get("reason"), variant=body.get("variant"),
                flag_metadata=metadata,
            )  # fmt: skip
        value = body["value"]
        # bool is an int to Python; a boolean flag is not an integer one.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return FlagResolutionDetails(
                default, ErrorCode.TYPE_MISMATCH,
                f"{key} is {type(value).__name__}, not {kinds[0].__name__}", Reason.ERROR,
            )  # fmt: skip
        # The type was checked against the one asked for just above.
        checked: T = value  # type: ignore[assignment]
        return FlagResolutionDetails(
            checked, reason=body.get("reason"), variant=body.get("variant"), flag_metadata=metadata
        )

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, (bool,), evaluation_context)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, (str,), evaluation_context)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, (int,), evaluation_context)

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, (float, int), evaluation_context)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Object,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Object]:
        return self._resolve(flag_key, default_value, (dict, list), evaluation_context)

    # The async client's calls: the same request, off the event loop.
    async def resolve_boolean_details_async(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return await asyncio.to_thread(
            self.resolve_boolean_details, flag_key, default_value, evaluation_context
        )

    async def resolve_string_details_async(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return await asyncio.to_thread(
            self.resolve_string_details, flag_key, default_value, evaluation_context
        )

    async def resolve_integer_details_async(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return await asyncio.to_thread(
            self.resolve_integer_details, flag_key, default_value, evaluation_context
        )

    async def resolve_float_details_async(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return await asyncio.to_thread(
            self.resolve_float_details, flag_key, default_value, evaluation_context
        )

    async def resolve_object_details_async(
        self,
        flag_key: str,
        default_value: Object,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Object]:
        return await asyncio.to_thread(
            self.resolve_object_details, flag_key, default_value, evaluation_context
        )
