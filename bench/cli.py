"""How long substratectl takes to say the broker cannot be used, beside the baseline of the
same run: ``substratectl status --help``, which starts the interpreter, imports the CLI and
parses its arguments, and needs no broker. The difference is what the broker problem costs.

    python -m bench.cli [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "substratectl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(args: list[str], url: str) -> tuple[float, int, str]:
    env = {**os.environ, "SUBSTRATE_AMQP_URL": url}
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return time.perf_counter() - started, done.returncode, done.stderr.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    live = os.environ.get("SUBSTRATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    host = live.split("@")[-1].split("/")[0]
    cases = {
        "status --help (baseline: start, import, parse)": (["status", "--help"], live),
        "status, nothing listens": (["status"], f"amqp://guest:guest@127.0.0.1:{free_port()}/"),
        "cells list, nothing listens": (
            ["cells", "list"],
            f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        ),
        "status, password refused": (["status"], f"amqp://guest:wrong@{host}/"),
        "status, unknown vhost": (["status"], f"amqp://guest:guest@{host}/no-such-vhost"),
    }
    print(f"{'case':<48} {'median s':>9} {'max s':>7}  exit  stderr lines")
    for name, (argv, url) in cases.items():
        runs = [timed(argv, url) for _ in range(args.rounds)]
        seconds = [r[0] for r in runs]
        lines = max(len(r[2].splitlines()) for r in runs)
        print(
            f"{name:<48} {statistics.median(seconds):>9.2f} {max(seconds):>7.2f}"
            f"  {runs[0][1]:>4}  {lines}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
