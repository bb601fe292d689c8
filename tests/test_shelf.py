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
