"""`python -m services.rollout`: Releases, staged rollouts and each cell's desired state."""

from __future__ import annotations

from common.runner import service_main
from services.rollout.bootstrap import setup
from services.rollout.settings import RolloutSettings


def main() -> None:
    service_main(
        "rollout",
        "Releases, staged rollouts and each cell's desired state.",
        setup,
        RolloutSettings,
    )


if __name__ == "__main__":
    main()
