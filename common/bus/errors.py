"""What can go wrong on the bus, as the caller sees it, and the sender guard handlers use.

Importable without aio-pika: handlers raise ``Refused`` and ``RpcFailure`` and call
``refuse_foreign_sender`` without touching the messaging library.
"""

from __future__ import annotations

from pydantic import ValidationError

from common.messages import CellReport, Delivery, sender_problem
from common.metrics import cell_messages_refused


class BusError(Exception):
    """A bus operation failed in a way the caller must see."""


class NotConnected(BusError):
    """The broker connection is down; the caller decides to retry or fail."""


class Unroutable(BusError):
    """A mandatory publish matched no queue."""


class PublishRefused(BusError):
    """The broker refused a publish (nack, forged user_id, missing permission)."""


class PublishNacked(PublishRefused):
    """The broker nacked a publish: a queue it routes to could not take it (a quorum queue
    between leaders while a node is lost, a full queue that rejects publishes)."""


class PublishTimeout(BusError):
    """The broker did not confirm in time (blocked by a memory or disk alarm, or overloaded)."""


class QueueMissing(BusError):
    """A queue the caller expected is not there."""


class ServiceUnavailable(BusError):
    """A request found no service to answer it."""


class RequestTimeout(ServiceUnavailable):
    """A request was not answered in time."""


class RemoteError(BusError):
    """The service answered a request with an error."""

    def __init__(self, service: str, code: str, message: str) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.code = code
        self.message = message


class Refused(Exception):
    """Raised by a handler for a message that must never be retried (e.g. a forged sender):
    the bus dead-letters it at once with this reason."""


class TryAgain(Exception):
    """Raised by a handler whose write kept losing races with concurrent writes: the delivery
    goes back to its queue at once, not after the pause a failure gets. Held for a pause it
    would hold back the acks of every delivery after it on its channel; it still counts
    against the delivery limit."""


class RpcFailure(Exception):
    """Raised by an RPC method: the caller gets it as a RemoteError with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse_foreign_sender(msg: CellReport, delivery: Delivery) -> None:
    """Dead-letter (never retry) and count a cell report that speaks for another cell."""
    problem = sender_problem(msg, delivery)
    if problem is not None:
        cell_messages_refused().labels(problem[0]).inc()
        raise Refused(problem[1])


def validation_summary(exc: ValidationError, *, under: str | None = None) -> str:
    """One line naming each field and its problem; ``under``: the fields are named from
    within that one (a reply's result)."""
    problems = []
    for err in exc.errors()[:5]:
        loc = err["loc"]
        if under is not None and loc[:1] == (under,):
            loc = loc[1:]
        where = ".".join(str(p) for p in loc) or "body"
        problems.append(f"{where}: {err['msg']}")
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (+{more} more)" if more > 0 else "")
