"""The Redis client the server talks through: one server, a Redis Cluster, or a Sentinel primary.

`make_client` picks by the settings: ``OPTSERVE_REDIS_CLUSTER_NODES`` or a URL that names a
node of a cluster (``INFO cluster`` says ``cluster_enabled:1``) gives redis-py's asyncio
`RedisCluster`; ``OPTSERVE_REDIS_SENTINELS`` gives the primary Sentinel names, followed
through failovers. `slot_connection` hands out one raw connection to the server that owns a
key's slot, for the step transaction's pipelined commands (WATCH/MULTI/EXEC must stay on one
connection to one node).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from ..errors import StoreUnavailable
from .shelf import shelf_of

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger("optserve")

Client = Redis | RedisCluster

__all__ = ["Client", "is_cluster", "make_client", "make_redis", "slot_connection"]


def make_redis(url: str, timeout_s: float, max_connections: int = 512,
               password: str | None = None) -> Redis:
    """A pooled asyncio client; redis-py's Python packer sends large values without copying.

    The pool blocks (up to `timeout_s`) when all its connections are busy, rather than
    failing at once: a burst of parallel steps waits its turn instead of getting 503s.
    """
    extra = {"password": password} if password else {}
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        retry_on_timeout=False,
        decode_responses=False,
        **extra,
    )
    pool.connection_class = closed_is_lost(pool.connection_class)
    return Redis(connection_pool=pool)


_LOST_CLASSES: dict[type, type] = {}


def closed_is_lost(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` whose write on a transport already closed (the peer reset it, a node was
    killed) raises redis-py's ConnectionError, which the clients retry or re-route and we
    answer 503, rather than uvloop's ``RuntimeError: unable to perform operation on
    <TCPTransport closed=True>; the handler is closed``, which was a 500. redis-py has
    already dropped the connection by then; only the error's type changes."""
    lost = _LOST_CLASSES.get(cls)
    if lost is None:
        async def send_packed_command(self: AbstractConnection, command: Any,
                                      check_health: bool = True) -> None:
            try:
                await cls.send_packed_command(self, command, check_health)
            except RuntimeError as exc:
                if "closed" not in str(exc):
                    raise
                raise RedisConnectionError(
                    f"Error writing to {self._host_error()}: the connection was closed "
                    f"({exc})") from exc

        lost = type(f"Lost{cls.__name__}", (cls,),
                    {"send_packed_command": send_packed_command})
        _LOST_CLASSES[cls] = lost
    return lost


def _hostports(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if item:
            host, _, port = item.rpartition(":")
            out.append((host or "127.0.0.1", int(port)))
    if not out:
        raise ValueError(f"no host:port in {text!r}")
    return out


def _common(settings: Settings) -> dict[str, Any]:
    t = settings.redis_timeout_s
    kw: dict[str, Any] = {"socket_timeout": t, "socket_connect_timeout": t,
                          "decode_responses": False}
    if settings.redis_password:
        kw["password"] = settings.redis_password
    return kw


async def _names_a_cluster(url: str, settings: Settings) -> bool:
    """Whether the node `url` names runs in cluster mode (tried for `redis_timeout_s`;
    a node that never answers is taken for a single server, with a warning)."""
    probe = make_redis(url, settings.redis_timeout_s, 2, settings.redis_password)
    deadline = time.monotonic() + settings.redis_timeout_s
    try:
        while True:
            try:
                info = await probe.info("cluster")
                return bool(int(info.get("cluster_enabled", 0)))
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.warning("could not ask %s whether it is a cluster node (%s); "
                                "treating it as one server", url, exc)
                    return False
                await asyncio.sleep(0.2)
    finally:
        await probe.aclose()
        await probe.connection_pool.disconnect()


class GentleCluster(RedisCluster):
    """redis-py's asyncio cluster client, with resets that leave connections in use alone.

    On ``CLUSTERDOWN``/uncovered slots (a shard lost), every few ``MOVED``s, and when a
    re-read of the slot map fails, redis-py 8.1 calls `aclose`, which disconnects *every*
    connection of every node, including those other requests are in the middle of using
    (our step transactions hold one across several round trips): their next write finds
    ``_writer`` gone (``AttributeError``) or the transport closed (``RuntimeError``), and
    requests on healthy shards answered 500. Here those resets do what redis-py already
    does for a single lost node: mark connections in use to be reconnected when released,
    drop idle ones, and re-read the slot map before the next command. `close_for_good`
    is the real close.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes_manager.__class__ = _GentleNodes  # same slots; only `aclose` differs
        lost = closed_is_lost(self.connection_kwargs.get("connection_class", Connection))
        self.connection_kwargs["connection_class"] = lost  # nodes found later
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = lost

    async def aclose(self) -> None:
        """A reset (see the class): the slot map is re-read before the next command."""
        self._initialize = True
        await self.nodes_manager.aclose()

    async def close_for_good(self) -> None:
        await RedisCluster.aclose(self)
        for attr in ("nodes_cache", "startup_nodes"):  # also when a reset came last
            await NodesManager.aclose(self.nodes_manager, attr)


class _GentleNodes(NodesManager):
    __slots__ = ()

    async def aclose(self, attr: str = "nodes_cache") -> None:
        """Connections in use are reconnected when released; idle ones are dropped now."""
        for node in list(getattr(self, attr).values()):
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()


async def make_client(settings: Settings) -> Client:
    """The client the settings ask for (see the module)."""
    common = _common(settings)
    if settings.redis_cluster_nodes:
        nodes = [ClusterNode(h, p) for h, p in _hostports(settings.redis_cluster_nodes)]
        return GentleCluster(startup_nodes=nodes, max_connections=settings.redis_max_connections,
                             **common)
    if settings.redis_sentinels:
        if not settings.redis_sentinel_master:
            raise ValueError("OPTSERVE_REDIS_SENTINELS needs OPTSERVE_REDIS_SENTINEL_MASTER")
        skw: dict[str, Any] = {"socket_timeout": settings.redis_timeout_s,
                               "socket_connect_timeout": settings.redis_timeout_s}
        if settings.redis_sentinel_password:
            skw["password"] = settings.redis_sentinel_password
        sentinel = Sentinel(_hostports(settings.redis_sentinels), sentinel_kwargs=skw, **common)
        primary = sentinel.master_for(settings.redis_sentinel_master,
                                      max_connections=settings.redis_max_connections)
        pool = primary.connection_pool
        pool.connection_class = closed_is_lost(pool.connection_class)
        return primary
    if not settings.redis_url:
        raise RuntimeError("OPTSERVE_REDIS_URL is not set; `optserve serve` starts a Redis "
                           "of its own when it is unset")
    if await _names_a_cluster(settings.redis_url, settings):
        return GentleCluster.from_url(settings.redis_url,
                                      max_connections=settings.redis_max_connections, **common)
    return make_redis(settings.redis_url, settings.redis_timeout_s,
                      settings.redis_max_connections, settings.redis_password)


def is_cluster(redis: Client) -> bool:
    return isinstance(redis, RedisCluster)


async def close_client(redis: Client) -> None:
    if isinstance(redis, GentleCluster):
        await redis.close_for_good()
        return
    await redis.aclose()
    if not is_cluster(redis):
        await redis.connection_pool.disconnect()  # a pool we passed in is ours to close


async def refresh_slots(redis: Client) -> None:
    """Have the cluster client re-read its slot map before its next command (after MOVED/ASK
    or a lost node). It is marked, as redis-py marks itself after a connection error, not
    re-read here: concurrent re-reads would close connections other requests are using."""
    if is_cluster(redis) and hasattr(redis, "_initialize"):
        redis._initialize = True


async def _acquire(node: ClusterNode, timeout_s: float) -> AbstractConnection:
    """A node's connection; its pool does not block, so wait here (as the single-server
    pool does) rather than fail a burst of steps at once."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        try:
            return node.acquire_connection()
        except MaxConnectionsError:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"no free connection to {node.name} in {timeout_s} s"
                                       ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)


@asynccontextmanager
async def slot_connection(redis: Client, key: str, timeout_s: float
                          ) -> AsyncIterator[AbstractConnection]:
    """One connection to the primary that owns `key`'s slot, for as long as the block runs."""
    if is_cluster(redis):
        await redis.initialize()  # a no-op once the slot map is known
        node = redis.get_node_from_key(key)
        conn = await _acquire(node, timeout_s)
        try:
            await node.disconnect_if_needed(conn)  # marked by a topology change: fresh state
            yield conn
        finally:
            node.release(conn)
    else:
        shelf = shelf_of(redis)
        conn = await shelf.take()
        try:
            yield conn
        except BaseException:
            await shelf.pool.release(conn)
            raise
        await shelf.give(conn)


def pubsub_client(redis: Client) -> Client:
    """The client the round notifier subscribes through: the client itself (on a cluster,
    the notifier opens a shard-channel connection per node; see round_notifier.py)."""
    return redis
