"""`python -m services.registry`: cells' identity, credentials, registration and liveness."""

from __future__ import annotations

from common.runner import service_main
from services.registry.bootstrap import setup
from services.registry.settings import RegistrySettings


def main() -> None:
    service_main(
        "registry",
        "Cells: identity, credentials, registration, liveness and actual state.",
        setup,
        RegistrySettings,
    )


if __name__ == "__main__":
    main()
