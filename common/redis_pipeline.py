"""Batching many small Redis script calls into one.

A consumer with a large prefetch runs many handlers at once, each wanting one small script
call. Calls made in the same turn of the event loop are gathered and sent as ONE script call
whose single argument is a JSON array of the calls; the script loops over them and returns
one result each. The client then packs and parses one command instead of dozens, which is
most of the client-side cost of a small script call. Each caller still gets its own result.

The script must take its items as ``cjson.decode(ARGV[1])`` and return an array of results
in the same order. It is sent as EVALSHA and loaded once if the server does not know it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


class BatchedScript:
    def __init__(self, redis: aioredis.Redis, script: str, max_batch: int = 500) -> None:
        self._redis = redis
        self._script = redis.register_script(script)
        self._max_batch = max_batch
        self._queued: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, *args: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((list(args), future))
        if len(self._queued) >= self._max_batch:
            self._start_flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        batch, self._queued = self._queued, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        payload = json.dumps([args for args, _ in batch])
        try:
            try:
                results = await self._redis.evalsha(self._script.sha, 0, payload)
            except NoScriptError:
                await self._redis.script_load(self._script.script)
                results = await self._redis.evalsha(self._script.sha, 0, payload)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
