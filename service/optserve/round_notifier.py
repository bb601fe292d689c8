"""Wakes requests waiting on a sync round when any process closes or fails it.

One Redis server (or Sentinel's primary): one subscription per process to
``keys.ROUNDS_CHANNEL`` fans each round's closure out to the futures waiting on its token.
A Redis Cluster: rounds are announced with ``SPUBLISH`` on ``keys.round_channel(sid)``, a
shard channel in the session's own slot (see `StepTxn.execute`), so a closure travels to
the one node that owns the session rather than over the cluster bus to every node; this
process ``SSUBSCRIBE``s to the channels of the sessions it has waiters on, over one
connection per node (redis-py 8.1's `ClusterPubSub.get_sharded_message` polls the nodes
in turn, each for the whole timeout, so a blocking reader per node answers sooner). A lost
subscription reconnects; meanwhile waiters fall back to their once-a-second look at the
round's outcome key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from .store import keys
from .store.clients import is_cluster

log = logging.getLogger("optserve")

KEEP_IDLE = 512  # shard channels kept subscribed with nobody waiting (sessions round again)


class RoundNotifier:
    """Round closures fanned out to waiting requests (see the module)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None
        self.listening = False  # the one-server subscription is in place
        self.shards = _ShardSubscriptions(redis, self._wake) if is_cluster(redis) else None

    async def future(self, token: str, sid: str) -> asyncio.Future[None]:
        """A future set when round `token` of session `sid` closes or fails; on a cluster
        the session's shard channel is subscribed before this returns."""
        if self.shards is not None:
            with contextlib.suppress(Exception):  # a lost node: the waiter polls
                await self.shards.add(keys.round_channel(sid))
        elif self.task is None or self.task.done():
            self.task = asyncio.create_task(self._listen())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(token, []).append(fut)
        return fut

    def announced(self) -> bool:
        """Whether a closure announced from now on reaches this process's futures (else a
        waiter reads the outcome first: its round may have closed before it subscribed)."""
        return self.shards is None and self.listening

    def forget(self, token: str, fut: asyncio.Future[None]) -> None:
        futs = self.waiters.get(token, [])
        if fut in futs:
            futs.remove(fut)
        if not futs:
            self.waiters.pop(token, None)

    def _wake(self, data: bytes | str) -> None:
        self.wake(json.loads(data).get("token"))

    def wake(self, token: str) -> None:
        """Wake round `token`'s waiters in this process (its closer may, before the
        announcement comes back from Redis)."""
        for fut in self.waiters.pop(token, []):
            if not fut.done():
                fut.set_result(None)

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.ROUNDS_CHANNEL)
                self.listening = True
                async for message in pubsub.listen():
                    self._wake(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to their checks
                log.debug("round notifier reconnecting after %s", exc)
                await asyncio.sleep(0.5)
            finally:
                self.listening = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self.shards is not None:
            await self.shards.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class _ShardSubscriptions:
    """SSUBSCRIBEd shard channels, one connection and one reader task per node."""

    def __init__(self, cluster: Any, wake: Any) -> None:
        self.cluster = cluster
        self.wake = wake
        self.channels: OrderedDict[str, str] = OrderedDict()  # channel -> node name, LRU
        self.nodes: dict[str, tuple[PubSub, asyncio.Task[None]]] = {}

    async def add(self, channel: str) -> None:
        await self.cluster.initialize()  # a no-op once the slot map is known
        node = self.cluster.get_node_from_key(channel)
        if self.channels.get(channel) == node.name and node.name in self.nodes:
            self.channels.move_to_end(channel)
            return
        pubsub = self._pubsub(node)
        await pubsub.ssubscribe(channel)
        self.channels[channel] = node.name
        while len(self.channels) > KEEP_IDLE:
            old, name = self.channels.popitem(last=False)
            if name in self.nodes:
                with contextlib.suppress(Exception):
                    await self.nodes[name][0].sunsubscribe(old)

    def _pubsub(self, node: Any) -> PubSub:
        if node.name in self.nodes:
            return self.nodes[node.name][0]
        kw = {k: v for k, v in node.connection_kwargs.items()
              if k in ("password", "username", "socket_connect_timeout")}
        pubsub = Redis(host=node.host, port=node.port, **kw).pubsub(
            ignore_subscribe_messages=True)
        task = asyncio.create_task(self._read(node.name, pubsub))
        self.nodes[node.name] = (pubsub, task)
        return pubsub

    async def _read(self, name: str, pubsub: PubSub) -> None:
        try:
            while True:
                if not pubsub.subscribed:  # the first SSUBSCRIBE is on its way
                    await asyncio.sleep(0.01)
                    continue
                message = await pubsub.get_message(timeout=None)
                if message is not None and message.get("type") in ("smessage", b"smessage"):
                    self.wake(message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the node went away: subscribe afresh on the next wait
            log.debug("round notifier lost shard %s: %s", name, exc)
        finally:
            if self.nodes.get(name, (None,))[0] is pubsub:
                del self.nodes[name]
            for channel in [c for c, n in self.channels.items() if n == name]:
                del self.channels[channel]
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        for _, task in list(self.nodes.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
