"""Routing tables: which handler gets which model. A service's handlers module lists its routes
with :func:`route`, which mypy checks: the handler must take exactly the model it is routed
(and the service's dependencies). The bus takes the routes; handlers never see the bus."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from pydantic import BaseModel

from common.messages import Delivery

M = TypeVar("M", bound=BaseModel)
D = TypeVar("D")

Handler = Callable[[Any, Delivery], Awaitable[Any]]
_NO_DEPS: Any = object()


@dataclass(frozen=True, slots=True)
class Route:
    """Deliveries of ``model`` (a message, or a request's params) go to ``handler``."""

    model: type[BaseModel]
    handler: Handler


@overload
def route(model: type[M], handler: Callable[[M, Delivery], Awaitable[object]]) -> Route: ...


@overload
def route(
    model: type[M], handler: Callable[[M, Delivery, D], Awaitable[object]], deps: D
) -> Route: ...


def route(model: type[Any], handler: Callable[..., Awaitable[Any]], deps: Any = _NO_DEPS) -> Route:
    """Route ``model`` to ``handler(model, delivery)``, or ``handler(model, delivery, deps)``
    when the service's dependencies are given."""
    if deps is _NO_DEPS:
        return Route(model, handler)
    # A plain function, not a coroutine: the handler's own coroutine is what the bus awaits,
    # without another frame per message.
    return Route(model, lambda msg, delivery: handler(msg, delivery, deps))


def routes_for(routes: Sequence[Route]) -> dict[type[BaseModel], Handler]:
    """The table as a dict, refusing a model routed twice."""
    table: dict[type[BaseModel], Handler] = {}
    for r in routes:
        if r.model in table:
            raise ValueError(f"{r.model.__name__} is routed twice")
        table[r.model] = r.handler
    return table
