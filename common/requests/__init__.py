"""Request/reply methods, typed: each method is a request model that names its service, its
method and its response type. A service registers a handler per request model; the operator CLI
(and any other caller) sends a request model and gets its response model back. Both sides
validate, so a wrong field is an error that names it, wherever it is made.

On the wire a request travels in the ``rpc.request.v1`` envelope (service, method, params) and
the answer in ``rpc.reply.v1`` (common.messages); the models here are the params and the result.
Like messages, a request or response changes only by adding optional fields.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter

from common.vocabulary import Role

R = TypeVar("R")
Q = TypeVar("Q", bound="Request[Any]")


class Request(BaseModel, Generic[R]):
    """A method's parameters; ``R`` is its response type."""

    # forbid: a misspelt parameter is an error, not a default.
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The service that answers, and the method's name on the wire. A request every service
    # answers (status) leaves ``service`` empty and the caller names the service.
    service: ClassVar[str]
    method: ClassVar[str]
    # A request that only reads: safe to send again when the broker nacked it (bus.call does).
    read_only: ClassVar[bool] = False
    # The least role that may send it (common/operators.py).
    needs: ClassVar[Role] = "operator"
    response_type: ClassVar[Any]
    response: ClassVar[TypeAdapter[Any]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for base in cls.__mro__:
            meta = getattr(base, "__pydantic_generic_metadata__", None)
            if meta and meta["origin"] is Request and meta["args"]:
                cls.response_type = meta["args"][0]
                cls.response = TypeAdapter(cls.response_type)
                return

    @classmethod
    def response_name(cls) -> str:
        """The response type as people read it: ``CellView``, ``list[ListedCell]``."""
        t = cls.response_type
        if get_origin(t) is list:
            return f"list[{get_args(t)[0].__name__}]"
        return str(t.__name__)


class Response(BaseModel):
    """A method's result. ``extra="ignore"``: an older caller reads a newer service's answer."""

    model_config = ConfigDict(frozen=True, extra="ignore")


REQUESTS: dict[tuple[str, str], type[Request[Any]]] = {}


def rpc(
    service: str, method: str, *, read_only: bool = False, role: Role | None = None
) -> Callable[[type[Q]], type[Q]]:
    """Register a request model as ``service``'s method ``method``; ``read_only`` for a method
    that changes nothing. ``role`` is the least role that may send it: by default a viewer
    for a read and an operator for a write."""

    def register(cls: type[Q]) -> type[Q]:
        if (service, method) in REQUESTS:
            raise ValueError(f"method {service}/{method} registered twice")
        cls.service = service
        cls.method = method
        cls.read_only = read_only
        cls.needs = role or ("viewer" if read_only else "operator")
        REQUESTS[(service, method)] = cls
        return cls

    return register


class ServiceStatus(Response):
    """Every service answers ``status``; each adds its own counts (kept as extra fields, so the
    operator's ``status`` shows them without knowing each service)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    service: str
    ready: bool


@rpc("", "status", read_only=True)
class Status(Request[ServiceStatus]):
    """Is the service up, and what does it hold?"""


def json_schema() -> dict[str, Any]:
    """The JSON Schema of every method's request and response."""
    for module in ("registry", "rollout", "flags", "infra", "audit", "operators"):
        importlib.import_module(f"{__name__}.{module}")  # each registers its methods
    out: dict[str, Any] = {}
    for (service, method), cls in sorted(REQUESTS.items()):
        out[f"{service or '*'}/{method}"] = {
            "request": cls.model_json_schema(),
            "response": cls.response.json_schema(),
        }
    return out
