"""`python -m services.infra_compliance`: the infra_compliance service."""

from __future__ import annotations

from common.runner import service_main
from services.infra_compliance.bootstrap import setup
from services.infra_compliance.settings import InfraSettings


def main() -> None:
    service_main(
        "infra_compliance",
        "Infrastructure template versions, deadlines and SLA holds.",
        setup,
        InfraSettings,
    )


if __name__ == "__main__":
    main()
