"""make dev: which of the ports it would listen on are taken. Arguments NAME=PORT; prints
``port PORT (NAME)`` for each one that cannot be bound on 127.0.0.1, nothing if all are free."""

from __future__ import annotations

import socket
import sys

for spec in sys.argv[1:]:
    name, port = spec.rsplit("=", 1)
    with socket.socket() as s:
        # As a server binds: a port in TIME_WAIT after an earlier run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            print(f"port {port} ({name})")
