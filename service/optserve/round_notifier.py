"""Wakes requests waiting on a sync round when any process closes or fails it.

One Redis pub/sub subscription per process (on ``keys.ROUNDS_CHANNEL``) fans each round's
closure out to the futures waiting on its token. A lost subscription reconnects; meanwhile
waiters fall back to their once-a-second look at the round's outcome key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from redis.asyncio import Redis

from .store import keys

log = logging.getLogger("optserve")


class RoundNotifier:
    """One pub/sub subscription per process, fanning round closures out to waiting requests."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.task: asyncio.Task[None] | None = None

    def future(self, token: str) -> asyncio.Future[None]:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._listen())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(token, []).append(fut)
        return fut

    def forget(self, token: str, fut: asyncio.Future[None]) -> None:
        futs = self.waiters.get(token, [])
        if fut in futs:
            futs.remove(fut)
        if not futs:
            self.waiters.pop(token, None)

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.ROUNDS_CHANNEL)
                async for message in pubsub.listen():
                    token = json.loads(message["data"]).get("token")
                    for fut in self.waiters.pop(token, []):
                        if not fut.done():
                            fut.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: waiters fall back to their checks
                log.debug("round notifier reconnecting after %s", exc)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
