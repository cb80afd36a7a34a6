"""`python -m services.rollout`: Releases, staged rollouts and each cell's desired state."""

from __future__ import annotations

from common.runner import service_main
from services.rollout.bootstrap import setup


def main() -> None:
    service_main("rollout", "Releases, staged rollouts and each cell's desired state.", setup)


if __name__ == "__main__":
    main()
