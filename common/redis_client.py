"""The services' Redis client, on one Redis or on a primary found through Sentinel.

After Redis restarts, every pooled connection is dead; a client that does not retry surfaces the
first command on each as a ConnectionError, which would fail an operator's request or count
against a message's delivery limit. Connection errors and timeouts are retried with a short
backoff instead (about 3 s in all, longer than a restart of Redis with its AOF), set here rather
than left to redis-py's defaults, which have changed between its releases. A retried write may
run twice if the first reached Redis: the stores' writes are guarded scripts (apply if newer, if
the fields read are unchanged), so a second run changes nothing.

With Sentinel (``SUBSTRATE_REDIS_SENTINELS``) each new connection asks the sentinels for the
current primary, and the retries last about 10 s: a failover takes the sentinels' down-after
time plus an election. A connection still open to a former primary, now a replica, answers
writes with READONLY; that is retried too, on a new connection to the new primary.

Each command in flight holds a connection of the client's pool. redis-py 8 caps a pool at 100
connections and fails the next command at once (MaxConnectionsError): in a storm of 10,000
registrations the registry's 256 deliveries in flight reached it, and registrations and status
requests failed. The pool here is bounded and blocking: a command waits for a connection instead,
so a burst costs waiting, never an error, and each process keeps at most POOL_CONNECTIONS.

Replication is asynchronous: a write the primary acknowledged can be lost if the primary dies
before a replica has it. ``Durability.wait`` (Redis WAIT) holds an operator's answer until a
replica has every write before it, so what an operator was told succeeded survives a failover.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.bus.errors import RpcFailure
from common.settings import ServiceSettings, sentinel_addresses

log = logging.getLogger(__name__)

# Redis answers one command at a time: more round trips in flight than this only queue there.
POOL_CONNECTIONS = 64
# How long a command waits for a connection before it fails with a ConnectionError (taking a
# connection is outside redis-py's retries); a burst passes through the pool in well under a
# second.
POOL_WAIT_SECONDS = 20.0


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to the primary the sentinels name, waited for as ``connect``'s are."""


def connect(url: str) -> aioredis.Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis.from_pool(pool)


def from_settings(settings: ServiceSettings) -> aioredis.Redis:
    """Redis at SUBSTRATE_REDIS_URL, or (with SUBSTRATE_REDIS_SENTINELS) the primary of
    SUBSTRATE_REDIS_SENTINEL_MASTER, with the URL's database and password."""
    if not settings.redis_sentinels:
        return connect(settings.redis_url)
    parsed = aioredis.connection.parse_url(settings.redis_url)
    sentinel = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        socket_timeout=2.0,
        sentinel_kwargs={"socket_timeout": 2.0},
    )
    primary: aioredis.Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=POOL_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        db=int(parsed.get("db", 0)),
        password=parsed.get("password"),
        decode_responses=True,
        socket_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 15),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ReadOnlyError],
    )
    return primary


# Incremented before each WAIT: WAIT counts the writes of its own connection, and a pool hands
# out several; one write on WAIT's connection, after the handler's writes on any, covers them
# all (replication is one ordered stream).
DURABILITY_KEY = "substrate:durability"


class Durability:
    """Redis WAIT before an operator is told a write succeeded (see the module's docstring).

    Waits for as many replicas as are connected, up to ``replicas``: with none connected there
    is no replica a failover could promote with the write missing, and refusing every answer
    would make a lost replica an outage of the control plane (logged instead).
    """

    def __init__(self, redis: aioredis.Redis, replicas: int, timeout_ms: int) -> None:
        self.redis, self.replicas, self.timeout_ms = redis, replicas, timeout_ms
        self._alone = False

    @classmethod
    def of(cls, redis: aioredis.Redis, settings: ServiceSettings) -> Durability:
        return cls(redis, settings.wait_replicas, settings.redis_wait_timeout_ms)

    async def wait(self) -> None:
        if self.replicas <= 0:
            return
        info = await self.redis.info("replication")
        wanted = min(self.replicas, int(info.get("connected_slaves", 0)))
        if wanted == 0:
            if not self._alone:
                log.warning("the Redis primary has no replica connected: answers do not wait")
            self._alone = True
            return
        self._alone = False
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.incr(DURABILITY_KEY)
            pipe.execute_command("WAIT", wanted, self.timeout_ms)
            _, confirmed = await pipe.execute()
        if int(confirmed) < wanted:
            raise RpcFailure(
                "not_replicated",
                f"{confirmed} of {wanted} Redis replicas confirmed the write within "
                f"{self.timeout_ms} ms; it is on the primary only and a failover could lose it "
                "(retrying is safe)",
            )
