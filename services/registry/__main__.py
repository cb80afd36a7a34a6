"""`python -m services.registry`: the registry service."""

from __future__ import annotations

from common.runner import service_main
from services.registry.bootstrap import setup


def main() -> None:
    service_main(
        "registry", "Cells: identity, credentials, registration, liveness and actual state.", setup
    )


if __name__ == "__main__":
    main()
