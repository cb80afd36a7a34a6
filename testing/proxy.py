"""A TCP proxy between an agent and the broker that a test can turn bad: ``delay`` every chunk
either way, ``blackhole`` (connections stay open, nothing passes: a dead link that looks alive),
``cut`` (every open connection is closed) and ``refuse`` (new connections are closed at once).
``heal`` makes it a plain proxy again. It runs on the test's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class Proxy:
    target_port: int
    host: str = "127.0.0.1"
    delay: float = 0.0
    blackhole: bool = False
    refuse: bool = False
    accepted: int = 0
    _server: asyncio.Server | None = None
    _links: set[asyncio.StreamWriter] = field(default_factory=set)
    _passing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        assert self._server is not None, "start the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` (to the target) pointed at the proxy instead."""
        return amqp_url.replace(f":{self.target_port}/", f":{self.port}/")

    async def start(self) -> None:
        self._passing.set()
        self._server = await asyncio.start_server(self._serve, self.host, 0)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def hole(self) -> None:
        """Black-hole: nothing passes either way until ``heal``."""
        self.blackhole = True
        self._passing.clear()

    def heal(self) -> None:
        self.blackhole, self.refuse, self.delay = False, False, 0.0
        self._passing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._links.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._passing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
