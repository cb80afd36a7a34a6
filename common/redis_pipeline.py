"""Automatic pipelining of Lua script calls.

A consumer with a prefetch of 64 runs up to 64 handlers at once, each awaiting its own Redis
round trip. Calls made in the same turn of the event loop are sent together as one pipeline
(one write, one read), which is most of the cost of a small script call on the client side.
Each caller still gets its own result or exception.

Scripts go out as EVALSHA directly: redis-py's own pipelined scripts ask SCRIPT EXISTS before
every pipeline, a round trip per batch. A script the server does not know (after a restart or
a flush) is loaded once and the affected calls are sent again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_Call = tuple[AsyncScript, list[Any], list[Any], asyncio.Future[Any]]


class AutoPipeline:
    def __init__(self, redis: aioredis.Redis, max_batch: int = 256) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._queued: list[_Call] = []
        self._flush_scheduled = False

    async def run(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((script, keys, args, future))
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
            asyncio.get_running_loop().create_task(self._flush(batch))

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def _flush(self, batch: list[_Call]) -> None:
        try:
            results = await self._execute(batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                for script in {id(batch[i][0]): batch[i][0] for i in missing}.values():
                    await self._redis.script_load(script.script)
                retried = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, retried, strict=True):
                    results[i] = result
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
