"""Connections kept out of redis-py's pool between steps (one server, or Sentinel's primary).

Taking a connection from redis-py's `BlockingConnectionPool` and giving it back costs about
50 us here (a lock, a condition, a timeout scope, observability hooks, a readiness probe):
a third of a small step's time in Redis. The step path's connections (`slot_connection`)
come from this shelf instead: kept checked out of the pool between uses, handed out without
a lock (one event loop), and probed cheaply, as the pool would probe them: one whose peer
closed it (its reader saw end of file) or with unread bytes waiting is dropped, never
reused. Only a connection whose block finished normally goes back on the shelf (after an
error it goes to the pool, which probes it again). At most `KEEP` wait here; the pool still
bounds how many exist, and closing the pool closes these too.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import AbstractConnection

KEEP = 8


class Shelf:
    """Idle connections of one pool, checked out of it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.idle: list[AbstractConnection] = []

    async def take(self) -> AbstractConnection:
        while self.idle:
            conn = self.idle.pop()
            if ready(conn):
                return conn
            await self.drop(conn)
        conn: AbstractConnection = await self.pool.get_connection()
        return conn

    async def give(self, conn: AbstractConnection) -> None:
        if len(self.idle) < KEEP and ready(conn):
            self.idle.append(conn)
        else:
            await self.pool.release(conn)

    async def drop(self, conn: AbstractConnection) -> None:
        await conn.disconnect()
        await self.pool.release(conn)


def ready(conn: AbstractConnection) -> bool:
    """Connected, its peer has not closed it, and nothing unread is waiting on it."""
    reader = getattr(conn, "_reader", None)
    return (reader is not None and getattr(conn, "_writer", None) is not None
            and not reader.at_eof() and not getattr(reader, "_buffer", b""))


def shelf_of(redis: Any) -> Shelf:
    """The client's shelf (made on first use)."""
    shelf: Shelf | None = getattr(redis, "_optserve_shelf", None)
    if shelf is None or shelf.pool is not redis.connection_pool:
        shelf = Shelf(redis.connection_pool)
        redis._optserve_shelf = shelf
    return shelf
