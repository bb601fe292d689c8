"""The step path's own idle connections (store/shelf.py), against a real redis-server."""

from __future__ import annotations

import asyncio

import redis as redis_sync

from optserve.settings import Settings
from optserve.store.clients import close_client, make_client, slot_connection
from optserve.store.shelf import shelf_of
from optserve.store.step_txn import run_batch


def test_kept_connections_are_reused_and_dead_ones_never_are(redis_url: str) -> None:
    async def main() -> None:
        client = await make_client(Settings(redis_url=redis_url))
        try:
            shelf = shelf_of(client)
            async with slot_connection(client, "k", 5) as conn:
                name = f"shelf-test-{id(conn)}"
                assert await run_batch(conn, [("CLIENT", "SETNAME", name)]) == [b"OK"]
            assert shelf.idle == [conn]
            async with slot_connection(client, "k", 5) as again:
                assert again is conn  # the same connection, without the pool
            # The server closes it while it waits on the shelf (a restart, a timeout, a
            # CLIENT KILL): the next user gets a live one, not an error.
            with redis_sync.Redis.from_url(redis_url) as admin:
                ids = [info["id"] for info in admin.client_list() if info.get("name") == name]
                assert len(ids) == 1
                admin.execute_command("CLIENT", "KILL", "ID", ids[0])
            await asyncio.sleep(0.2)  # the loop sees the close
            async with slot_connection(client, "k", 5) as fresh:
                assert await run_batch(fresh, [("PING",)]) == [b"PONG"]
                assert await run_batch(fresh, [("CLIENT", "GETNAME")]) == [None]  # a new one
            # A block that raises gives its connection to the pool (which probes it), not
            # to the shelf.
            shelf.idle.clear()
            try:
                async with slot_connection(client, "k", 5):
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            assert shelf.idle == []
        finally:
            await close_client(client)

    asyncio.run(main())


def test_a_batch_past_its_deadline_is_redis_py_s_timeout_and_drops_the_connection(
        redis_url: str) -> None:
    """One deadline for a whole batch (`run_batch`): a Redis that does not answer (writes
    paused) gives redis-py's TimeoutError after the socket timeout, the connection is
    dropped, and the next batch works once Redis answers again."""
    import time

    from redis.exceptions import TimeoutError as RedisTimeoutError

    async def main() -> None:
        client = await make_client(Settings(redis_url=redis_url, redis_timeout_s=0.5))
        try:
            with redis_sync.Redis.from_url(redis_url) as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
                t0 = time.monotonic()
                async with slot_connection(client, "k", 5) as conn:
                    try:
                        await run_batch(conn, [("SET", "shelf:paused", "1")])
                    except RedisTimeoutError:
                        pass
                    else:
                        raise AssertionError("a paused write answered")
                    assert 0.4 < time.monotonic() - t0 < 1.4
                    assert not conn.is_connected and conn.socket_timeout == 0.5
                await asyncio.sleep(1.2)  # the pause ends
                async with slot_connection(client, "k", 5) as conn:
                    assert await run_batch(conn, [("SET", "shelf:paused", "2"),
                                                  ("GET", "shelf:paused")]) == [b"OK", b"2"]
        finally:
            await close_client(client)

    asyncio.run(main())
