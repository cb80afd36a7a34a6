"""An in-cell service for health checks to look at, on loopback: an HTTP page whose status and
body a test sets, a Prometheus-compatible instant-query endpoint (``/api/v1/query``) that
answers each query with the samples a test sets (none: an empty result), and ``/metrics`` for a
real Prometheus to scrape."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Probed:
    url: str = ""
    status: int = 200
    body: str = "ok"
    # query -> the samples' values (an empty list: no data).
    samples: dict[str, list[float]] = field(default_factory=dict)
    # Served on /metrics in Prometheus's text format, for a real Prometheus to scrape.
    metrics: dict[str, float] = field(default_factory=dict)
    hits: int = 0


@contextmanager
def probe_server() -> Iterator[Probed]:
    probed = Probed()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            probed.hits += 1
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/api/v1/query":
                query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
                values = probed.samples.get(query, [])
                result = [{"metric": {"i": str(i)}, "value": [0, str(v)]} for i, v in
                          enumerate(values)]  # fmt: skip
                body = json.dumps(
                    {"status": "success", "data": {"resultType": "vector", "result": result}}
                ).encode()
                status = 200
            elif url.path == "/metrics":
                status = 200
                body = "".join(f"{k} {v}\n" for k, v in probed.metrics.items()).encode()
            else:
                status, body = probed.status, probed.body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    probed.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield probed
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
