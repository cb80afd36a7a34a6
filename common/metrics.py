"""The metrics and health server every process runs, and the bus's own metrics.

An aiohttp server: it serves /metrics, /healthz and whatever extra routes a process adds (the
cell agent's maintenance gate, flags and OFREP). It binds to one address only; the cell agent
binds it to loopback so a cell never listens on its network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

# Nothing this server is sent is large: an OFREP request is a small JSON context.
MAX_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(status, json.dumps(payload).encode() + b"\n")

    def web(self) -> web.Response:
        from aiohttp import web

        return web.Response(
            status=self.status, body=self.body, headers={"Content-Type": self.content_type}
        )


# A GET route's handler gets what follows its prefix, URL-decoded ("" for the prefix itself).
Route = Callable[[str], Awaitable[Response]]
HealthCheck = Callable[[], dict[str, Any]]


class MetricsServer:
    """Serves /metrics, /healthz (200 when ``health()['ok']``, else 503) and extra routes. GET
    routes answer HEAD too; an unknown path is a JSON 404, a wrong method a JSON 405."""

    def __init__(self, health: HealthCheck, host: str = "127.0.0.1", port: int = 0) -> None:
        # Imported here: the CLI imports this module (the bus's metrics) but serves nothing.
        from aiohttp import web

        self._health = health
        self._host = host
        self._port = port
        self.app = web.Application(
            client_max_size=MAX_REQUEST_BYTES, middlewares=[web.middleware(_json_errors)]
        )
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self._runner: web.AppRunner | None = None

    def route(self, prefix: str, handler: Route) -> None:
        """``GET prefix`` and ``GET prefix/ANYTHING``, before start."""

        async def serve(request: web.Request) -> web.StreamResponse:
            return (await handler(request.match_info.get("tail", ""))).web()

        prefix = prefix.rstrip("/")
        self.app.router.add_get(prefix, serve)
        self.app.router.add_get(prefix + "/{tail:.*}", serve)

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """aiohttp route definitions (other methods than GET), before start."""
        self.app.add_routes(list(routes))

    @property
    def port(self) -> int:
        assert self._runner is not None, "server not started"
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        from aiohttp import web

        # Every request is not worth a log line; the metrics count what matters.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("metrics and health on http://%s:%d/", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return Response(200, generate_latest(), CONTENT_TYPE_LATEST).web()

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        state = self._health()
        return Response.json(200 if state.get("ok") else 503, state).web()


async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404/405/413 as JSON, like every other answer here."""
    from aiohttp import web

    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return Response.json(exc.status, {"error": exc.reason}).web()


@dataclass(frozen=True, slots=True)
class BusMetrics:
    published: Counter
    consumed: Counter
    handling: Histogram
    # Labelled children, looked up once: labels() takes a lock and builds a tuple per call,
    # which shows on the per-message path.
    _children: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def count_published(self, message_type: str, outcome: str) -> None:
        key = ("p", message_type, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.published.labels(message_type, outcome)
        child.inc()

    def count_consumed(self, queue: str, outcome: str, seconds: float) -> None:
        key = ("c", queue, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.consumed.labels(queue, outcome)
        child.inc()
        histogram = self._children.get(("h", queue, ""))
        if histogram is None:
            histogram = self._children[("h", queue, "")] = self.handling.labels(queue)
        histogram.observe(seconds)


@cache
def cell_messages_refused() -> Counter:
    """Cell reports dead-lettered because they speak for another cell, in whichever service
    consumed them (made on first use, so a process that never checks a sender shows none)."""
    return Counter(
        "substrate_cell_messages_refused",
        "Cell messages dead-lettered for their sender, by reason",
        ["reason"],
    )


@cache
def bus_metrics(namespace: str) -> BusMetrics:
    """The bus's counters, named for the process kind (``substrate`` or ``cell_agent``)."""
    return BusMetrics(
        published=Counter(
            f"{namespace}_bus_published_messages",
            "Messages published and confirmed by the broker, by type and outcome",
            ["type", "outcome"],
        ),
        consumed=Counter(
            f"{namespace}_bus_consumed_messages",
            "Messages consumed, by queue and outcome (acked, dead_lettered, retried, requeued)",
            ["queue", "outcome"],
        ),
        handling=Histogram(
            f"{namespace}_bus_handling_seconds",
            "Time from delivery to ack, by queue",
            ["queue"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        ),
    )
