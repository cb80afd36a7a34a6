"""`python -m services.flags`: Feature flag definitions, their audit log and evaluation."""

from __future__ import annotations

from common.runner import service_main
from services.flags.bootstrap import setup
from services.flags.settings import FlagsSettings


def main() -> None:
    service_main(
        "flags", "Feature flag definitions, their audit log and evaluation.", setup, FlagsSettings
    )


if __name__ == "__main__":
    main()
