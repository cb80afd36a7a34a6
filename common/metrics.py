"""The metrics and health server every process runs, and the bus's own metrics.

A tiny HTTP/1.1 server on asyncio: it serves /metrics, /healthz and whatever extra GET routes a
process adds (the cell agent's maintenance gate and flags). It binds to one address only; the
cell agent binds it to loopback so a cell never listens on its network.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(status, json.dumps(payload).encode() + b"\n")


Route = Callable[[str], Awaitable[Response]]
HealthCheck = Callable[[], dict[str, Any]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class MetricsServer:
    """Serves /metrics, /healthz (200 when ``health()['ok']``, else 503) and extra routes.

    A route is matched by the longest registered prefix and gets the full path.
    """

    def __init__(self, health: HealthCheck, host: str = "127.0.0.1", port: int = 0) -> None:
        self._health = health
        self._host = host
        self._port = port
        self._routes: dict[str, Route] = {}
        self._server: asyncio.Server | None = None

    def route(self, prefix: str, handler: Route) -> None:
        self._routes[prefix] = handler

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics and health on http://%s:%d/", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _respond(self, method: str, path: str) -> Response:
        if method != "GET":
            return Response.json(405, {"error": "only GET"})
        if path == "/metrics":
            return Response(200, generate_latest(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            state = self._health()
            return Response.json(200 if state.get("ok") else 503, state)
        matches = [p for p in self._routes if path == p or path.startswith(p.rstrip("/") + "/")]
        if matches:
            return await self._routes[max(matches, key=len)](path)
        return Response.json(404, {"error": f"no route {path}"})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed: every route is a GET without a body
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            response = await self._respond(parts[0], parts[1].split("?", 1)[0])
            reason = _REASONS.get(response.status, "")
            writer.write(
                f"HTTP/1.1 {response.status} {reason}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + response.body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics server failed to answer")
        finally:
            writer.close()


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
