"""Prometheus's configuration: what it scrapes and which rules it evaluates. compose's file
(compose/prometheus/prometheus.yml) is written by hand for its fixed service names; make dev and
the tests build theirs here, for the ports their processes listen on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[1] / "compose" / "prometheus" / "alerts.yml"


def config(
    jobs: Mapping[str, Sequence[str]],
    *,
    rabbitmq: str,
    vhost: str | None = None,
    interval: str = "15s",
    rules: Path = RULES,
) -> str:
    """A configuration scraping each job's ``host:port`` targets, RabbitMQ's own exporter
    (aggregated, and per queue for queue depths and dead letters), with the alert rules."""
    scrape: list[dict[str, object]] = [
        {"job_name": job, "static_configs": [{"targets": list(targets)}]}
        for job, targets in jobs.items()
    ]
    scrape.append({"job_name": "rabbitmq", "static_configs": [{"targets": [rabbitmq]}]})
    params: dict[str, list[str]] = {"family": ["queue_coarse_metrics"]}
    if vhost is not None:
        params["vhost"] = [vhost]
    scrape.append(
        {
            "job_name": "rabbitmq-queues",
            "metrics_path": "/metrics/detailed",
            "params": params,
            "static_configs": [{"targets": [rabbitmq]}],
        }
    )
    document = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": scrape,
    }
    return yaml.safe_dump(document, sort_keys=False)
