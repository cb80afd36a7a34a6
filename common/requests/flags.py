"""The flags service's methods: flag definitions and their history, central evaluation, the
preview of a change. The flag file is ``common.flags.Flag``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from common.flags import KEY_PATTERN, Flag, Reason
from common.requests import Request, Response, ServiceStatus, rpc

# What a change did to a flag (its history says it too).
FlagAction = Literal["created", "updated", "deleted"]


class FlagChange(Response):
    key: str
    changed: bool
    snapshot_version: int
    # Absent when nothing changed.
    action: FlagAction | None = None
    # Set when the change was kept to be made later: what it waits for (a second operator's
    # approval, its time), in words; `flags pending` lists it.
    waits: str | None = None


class PendingChange(Response):
    """A flag change kept to be made later: at its time, or once a second operator approved
    it (a change of answers in a stage the flags service's approval_stages names)."""

    key: str
    flag: Flag
    # The flag as it was when the change was asked for (None: it did not exist).
    base: str | None
    asked_by: str
    asked_at: AwareDatetime
    at: AwareDatetime | None = None
    approval: Literal["needed", "approved", "not_needed"]
    approved_by: str | None = None
    # Cells of the approval stages whose answer it changes.
    flips: int = 0


class FlagDeleted(Response):
    key: str
    deleted: bool
    snapshot_version: int


class FlagSummary(Response):
    key: str
    owner: str
    enabled: bool
    default_variant: str
    rules: int
    requires_release: str | None
    description: str


class FlagView(Flag):
    """A flag as stored, and the snapshot version it is part of."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    snapshot_version: int


class HistoryEntry(Response):
    at: str
    actor: str
    action: FlagAction
    # Top-level fields that changed: {field: {"from": ..., "to": ...}}.
    diff: dict[str, dict[str, Any]]
    version: int


class Answer(Response):
    """A flag's value for one cell: the same JSON as an agent's local ``GET /flags/KEY``."""

    key: str
    value: Any
    variant: str | None
    reason: Reason
    snapshot_version: int
    rule: int | None = None
    rule_name: str | None = None

    @model_serializer(mode="wrap")
    def _rule_only_when_one_matched(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        if isinstance(out, dict) and out.get("rule") is None:
            out.pop("rule", None)
            out.pop("rule_name", None)
        return out


class SnapshotView(Response):
    version: int
    flags: list[dict[str, Any]]


class Flip(Response):
    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    stage: str
    org: str
    from_: str = Field(alias="from")
    to: str
    cells: int


class Preview(Response):
    key: str
    cells: int
    flipping: int
    # Cells among them held for their infrastructure (out of SLA): they get no application
    # update, so a flag that needs a newer release stays off for them.
    held: int = 0
    by_stage: dict[str, dict[str, int]]
    by_org: dict[str, dict[str, int]]
    changes: list[Flip]


class FlagsServiceStatus(ServiceStatus):
    flags: int
    snapshot_version: int


@rpc("flags", "flags.set")
class FlagsSet(Request[FlagChange]):
    """Create or replace a flag (unchanged content is not a change); with ``at``, at that
    time."""

    flag: Flag
    at: AwareDatetime | None = None


@rpc("flags", "flags.enable")
class FlagsEnable(Request[FlagChange]):
    """Switch a flag on or off as it is otherwise defined: the kill switch."""

    key: str = Field(pattern=KEY_PATTERN)
    enabled: bool
    at: AwareDatetime | None = None


@rpc("flags", "flags.approve")
class FlagsApprove(Request[FlagChange]):
    """Make a change that waits for approval (at its time, if it has one); never by the
    operator who asked for it."""

    key: str = Field(pattern=KEY_PATTERN)


@rpc("flags", "flags.cancel")
class FlagsCancel(Request[PendingChange]):
    key: str = Field(pattern=KEY_PATTERN)


@rpc("flags", "flags.pending", read_only=True)
class FlagsPending(Request[list[PendingChange]]):
    pass


@rpc("flags", "flags.delete")
class FlagsDelete(Request[FlagDeleted]):
    key: str = Field(pattern=KEY_PATTERN)


@rpc("flags", "flags.list", read_only=True)
class FlagsList(Request[list[FlagSummary]]):
    pass


@rpc("flags", "flags.show", read_only=True)
class FlagsShow(Request[FlagView]):
    key: str = Field(pattern=KEY_PATTERN)


@rpc("flags", "flags.history", read_only=True)
class FlagsHistory(Request[list[HistoryEntry]]):
    key: str = Field(pattern=KEY_PATTERN)


@rpc("flags", "flags.eval", read_only=True)
class FlagsEval(Request[Answer]):
    """``cell``: a cell the service knows; or ``attributes``: a context given in full."""

    key: str
    cell: str | None = None
    attributes: dict[str, Any] | None = None
    default: Any = None


@rpc("flags", "flags.snapshot", read_only=True)
class FlagsSnapshotShow(Request[SnapshotView]):
    pass


@rpc("flags", "flags.preview", read_only=True)
class FlagsPreview(Request[Preview]):
    """Which cells would flip if this flag were set; nothing is written."""

    flag: Flag
