"""The audit log every service keeps of the requests it was sent: each write, and each request
it refused, with the operator as the broker validated them (common/audit.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from common.requests import Request, Response, rpc

AuditResult = Literal["ok", "refused", "failed"]


class AuditRecord(Response):
    at: AwareDatetime
    service: str
    method: str
    # The request's user_id, as the broker validated it ("" for a request without one).
    operator: str
    # Their role when the request came ("" for none).
    role: str
    result: AuditResult
    # What the request was about: a cell, a version, a flag or an operator ("" for none).
    target: str
    # Why it was refused or failed, or what it asked for ("" when there is nothing to add).
    detail: str
    message_id: str


@rpc("", "audit.list", read_only=True)
class AuditList(Request[list[AuditRecord]]):
    """The newest entries first, at most ``limit``, filtered."""

    since: AwareDatetime | None = None
    operator: str | None = Field(default=None, max_length=64)
    target: str | None = Field(default=None, max_length=128)
    limit: int = Field(default=200, ge=1, le=5000)
