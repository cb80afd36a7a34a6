"""The broker's boot-time definitions for compose: the vhost, the control plane's exchanges,
service queues and bindings (from common.topology, so the arguments are exactly the ones the
services declare), a policy bounding cells' command queues, and one broker user per service
with the least it needs, plus an operator. No cell is in it: the broker re-applies the file at
every boot and would overwrite what the registry made at run time.

``python -m deploy.rabbitmq`` writes compose/rabbitmq/definitions.json; ``--check`` exits 1 if
the file is not what this module makes (make lint runs it).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from pathlib import Path

from common import topology
from common.messages import BROADCAST_EXCHANGE, COMMANDS_EXCHANGE, DLX_EXCHANGE, EVENTS_EXCHANGE

OUT = Path(__file__).resolve().parents[1] / "compose" / "rabbitmq" / "definitions.json"
VHOST = "/"
# compose's demo passwords (compose/docker-compose.yml): change both there and here, and
# regenerate, for anything but a demo.
PASSWORDS = {
    "op-admin": "op-admin-demo-password",
    "svc-registry": "svc-registry-demo-password",
    "svc-rollout": "svc-rollout-demo-password",
    "svc-flags": "svc-flags-demo-password",
    "svc-infra": "svc-infra-demo-password",
}


def password_hash(user: str, password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)). The
    salt comes from the user name so the file is the same every time it is made."""
    salt = hashlib.sha256(f"substrate:{user}".encode()).digest()[:4]
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


CELL_QUEUES = r"cell\..+"


def _either(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


# The exchanges services publish to; a request's reply goes through the default exchange.
PUBLISHED = [
    re.escape(n)
    for n in (EVENTS_EXCHANGE, COMMANDS_EXCHANGE, DLX_EXCHANGE, BROADCAST_EXCHANGE, "amq.default")
]


def _service_permissions(service: str) -> dict[str, str]:
    """Read its own queues; write what services publish to; configure nothing (the
    definitions declare the static topology)."""
    own = [
        re.escape(q.name) for q in topology.SERVICE_QUEUES[service] if not q.name.endswith(".dead")
    ]
    return {"configure": "^$", "write": _either(*PUBLISHED), "read": _either(*own)}


def definitions(vhost: str = VHOST) -> dict[str, object]:
    """Everything the broker loads at boot, for ``vhost`` (compose's is "/")."""
    plane = topology.control_plane()
    # The registry makes each cell's command queue and binds it to the commands exchange, and
    # the shared dead-letter queue to the DLX (a bind reads the exchange and writes the queue),
    # and manages cells' broker users (the management API needs the administrator tag for that).
    # Declaring a queue with a dead-letter exchange asks for read on the queue and write on the
    # exchange, so the registry may read cells' queues (it consumes none).
    own = [
        re.escape(q.name)
        for q in topology.SERVICE_QUEUES["registry"]
        if not q.name.endswith(".dead")
    ]
    registry = {
        "configure": _either(CELL_QUEUES),
        "write": _either(*PUBLISHED, CELL_QUEUES),
        "read": _either(
            *own,
            CELL_QUEUES,
            re.escape(COMMANDS_EXCHANGE),
            re.escape(DLX_EXCHANGE),
            re.escape(BROADCAST_EXCHANGE),
        ),
    }
    permissions = {
        "op-admin": {"configure": ".*", "write": ".*", "read": ".*"},
        "svc-registry": registry,
        "svc-rollout": _service_permissions("rollout"),
        "svc-flags": _service_permissions("flags"),
        "svc-infra": _service_permissions("infra_compliance"),
    }
    tags = {"op-admin": ["administrator"], "svc-registry": ["administrator"]}
    return {
        "rabbit_version": "3.10.8",
        "users": [
            {
                "name": user,
                "password_hash": password_hash(user, password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags.get(user, []),
            }
            for user, password in PASSWORDS.items()
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": user, "vhost": vhost, **p} for user, p in permissions.items()],
        "topic_permissions": [],
        "parameters": [],
        "policies": [
            {
                "vhost": vhost,
                "name": policy.name,
                "pattern": policy.pattern,
                "apply-to": "queues",
                "priority": 0,
                "definition": policy.definition,
            }
            for policy in topology.POLICIES
        ],
        "exchanges": [
            {
                "name": ex.name,
                "vhost": vhost,
                "type": ex.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for ex in plane.exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": q.arguments(),
            }
            for q in plane.queues
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for q in plane.queues
            for b in q.bindings
        ],
    }


def rendered() -> str:
    return json.dumps(definitions(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compose's RabbitMQ definitions")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    if args.check:
        if not OUT.exists() or OUT.read_text() != rendered():
            print(f"{OUT} is out of date; run `make definitions`", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(rendered())
    return 0


if __name__ == "__main__":
    sys.exit(main())
