"""The services' Redis client.

After Redis restarts, every pooled connection is dead; redis-py's defaults surface the first
command on each as a ConnectionError, which would fail an operator's request or count against a
message's delivery limit. Connection errors and timeouts are retried with a short backoff
instead (about 3 s in all, longer than a restart of Redis with its AOF). A retried write may run
twice if the first reached Redis: the stores' writes are guarded scripts (apply if newer, if the
fields read are unchanged), so a second run changes nothing.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str) -> aioredis.Redis:
    return aioredis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
