"""A customer's deferral of updates: ``cell-agent defer --until TIME --reason ...`` asks the
control plane (in a ``sync`` report with reason ``defer``, so a cell needs no new permission)
not to update the cell before then; rollout decides within the vendor's policy (at most
``max_deferral_days``; a release past its deadline, such as a security release, goes through
anyway) and answers with ``DeferralDecided`` on the cell's command queue."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AwareDatetime

from common.fields import Name, clean_text
from common.messages import Command, wire


@wire("command.deferral-decided.v1")
class DeferralDecided(Command):
    """The control plane's answer to a deferral (or its cancellation)."""

    kind: ClassVar[str] = "deferral-decided"

    request_id: Name
    accepted: bool
    # The deferral in force after the decision (None: none).
    until: AwareDatetime | None = None
    # Why it was refused, or what holds despite it.
    reason: Annotated[str, clean_text(500)] = ""
