"""Redis refusals become problems of their own, not 500s: a full store (507, and DELETE still
frees space), a read-only replica after a failover (503), and /readyz says so.

Real redis-servers (one with ``maxmemory`` and ``noeviction``, a pair that fails over) in
front of real optserve processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import torch

from optserve.store.embedded import EmbeddedRedis
from tests.helpers import ST, create, jt, snapshot, st_body, step


@pytest.fixture
def own_redis() -> Iterator[Callable[..., EmbeddedRedis]]:
    started: list[EmbeddedRedis] = []

    def start(*extra: str) -> EmbeddedRedis:
        server = EmbeddedRedis(extra_args=("--maxmemory-policy", "noeviction", *extra))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def settled_memory(r: redis.Redis) -> int:
    """used_memory once Redis has shrunk idle clients' buffers (its cron does it lazily)."""
    last = used_memory(r)
    for _ in range(100):
        time.sleep(0.3)
        now = used_memory(r)
        if abs(now - last) < 8 * 1024:
            return now
        last = now
    return last


def writes_refused(c: httpx.Client, sid: str, status: int, code: str) -> None:
    """Create, PUT params, PATCH, a step and PUT state: each refused, nothing changed."""
    before = snapshot(c, sid)
    cur = c.get(f"/v1/sessions/{sid}").json()["version"]
    replies = [
        c.post("/v1/sessions", json={"params": {"w": jt([1.0, 2.0])}}),
        c.put(f"/v1/sessions/{sid}/params", content=st_body({"w": torch.ones(2)}),
              headers={"content-type": ST, "if-match": f'"{cur}"'}),
        c.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.5}}),
        step(c, sid, {"w": torch.ones(2)}),
        c.put(f"/v1/sessions/{sid}/state", content=c.get(f"/v1/sessions/{sid}/state").content,
              headers={"content-type": ST, "if-match": f'"{cur}"'}),
    ]
    for r in replies:
        assert r.status_code == status, (r.request.method, r.request.url, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code, r.text
        assert int(r.headers["retry-after"]) >= 1
    assert snapshot(c, sid) == before
    assert c.get(f"/v1/sessions/{sid}").json()["hyperparams"]["lr"] != 0.5


def test_out_of_memory_is_507_and_delete_frees_space(
        own_redis: Callable[..., EmbeddedRedis], make_server: Any) -> None:
    store = own_redis()
    srv = make_server(redis_url=store.url)
    r = store.client()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = create(c, {"w": torch.tensor([1.0, -2.0])})["id"]
        assert step(c, sid, {"w": torch.tensor([0.5, -0.5])}).status_code == 200
        big = create(c, {"w": torch.zeros(512 * 1024)})["id"]  # 2 MiB of parameters
        # Full: Redis's memory limit just under what it holds (maxmemory, noeviction).
        r.config_set("maxmemory", settled_memory(r) - 256 * 1024)
        assert c.get("/readyz").status_code == 503
        assert c.get("/readyz").json()["code"] == "store_unavailable"
        writes_refused(c, sid, 507, "store_full")
        full = c.post("/v1/sessions", json={}).json()
        assert "out of memory" in full["detail"] and "Deleting sessions" in full["detail"]
        assert full["status"] == 507 and full["title"] == "Insufficient storage"
        # DELETE works while Redis refuses writes, and frees what it held.
        held = used_memory(r)
        assert c.delete(f"/v1/sessions/{big}").status_code == 204
        assert c.get(f"/v1/sessions/{big}").status_code == 404
        assert used_memory(r) < held - 1024 * 1024
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/sessions", json={"params": {"w": jt([1.0])}}).status_code == 201
        assert step(c, sid, {"w": torch.tensor([0.5, -0.5])}).status_code == 200
        # Full again: a session can be deleted even with no room for its step lock.
        r.config_set("maxmemory", settled_memory(r) - 64 * 1024)
        assert c.post("/v1/sessions", json={}).status_code == 507
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        assert c.get(f"/v1/sessions/{sid}").status_code == 404


def _wait_link_up(r: redis.Redis, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = r.info("replication")
            if info.get("master_link_status") == "up" and not r.info("persistence")["loading"]:
                return
        except redis.exceptions.BusyLoadingError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"replication link not up: {r.info('replication')}")


def test_read_only_after_failover_is_503(
        own_redis: Callable[..., EmbeddedRedis], make_server: Any) -> None:
    primary, other = own_redis(), own_redis()
    srv = make_server(redis_url=primary.url)
    p, q = primary.client(), other.client()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid = create(c, {"w": torch.tensor([1.0, -2.0])})["id"]
        assert step(c, sid, {"w": torch.tensor([0.5, -0.5])}).status_code == 200
        before = snapshot(c, sid)
        # Fail over: `other` takes a copy and is promoted; the old primary, which the
        # service still talks to, becomes its read-only replica.
        q.replicaof(primary.host, primary.port)
        _wait_link_up(q)
        q.replicaof("NO", "ONE")
        p.replicaof(other.host, other.port)
        _wait_link_up(p)
        assert snapshot(c, sid) == before  # reads work on the replica
        assert c.get("/readyz").status_code == 503
        writes_refused(c, sid, 503, "store_unavailable")
        gone = c.delete(f"/v1/sessions/{sid}")
        assert gone.status_code == 503 and gone.json()["code"] == "store_unavailable"
        assert "retry-after" in gone.headers
        assert "READONLY" in gone.json()["detail"]
        assert snapshot(c, sid) == before


@pytest.mark.parametrize(("reply", "code"), [
    ("OOM command not allowed when used memory > 'maxmemory'.", "store_full"),
    ("READONLY You can't write against a read only replica.", "store_unavailable"),
    ("MOVED 3999 127.0.0.1:6381", "store_unavailable"),
    ("ASK 3999 127.0.0.1:6381", "store_unavailable"),
    ("CLUSTERDOWN The cluster is down", "store_unavailable"),
    ("TRYAGAIN Multiple keys request during rehashing of slot", "store_unavailable"),
    ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
     "store_unavailable"),
    ("LOADING Redis is loading the dataset in memory", "store_unavailable"),
    ("ERR Error running script (call to f_1): @user_script:3: @user_script: 3: -OOM "
     "command not allowed when used memory > 'maxmemory'.", "store_full"),
    ("ERR Error running script (call to f_1): @user_script:1: @user_script: 1: -READONLY "
     "You can't write against a read only replica.", "store_unavailable"),
])
def test_every_refusal_reply_is_classified(reply: str, code: str) -> None:
    """Each error reply, parsed by redis-py's own parser, maps to its problem code."""
    from redis._parsers.base import BaseParser

    from optserve.store.faults import classify

    exc = BaseParser.parse_error(reply)
    domain = classify(exc)
    assert domain is not None and domain.code == code and domain.retry_after
    assert classify(BaseParser.parse_error("ERR unknown command 'FOO'")) is None
    assert classify(BaseParser.parse_error("WRONGTYPE Operation against a key")) is None


def test_a_closed_transport_is_a_lost_connection(redis_url: str) -> None:
    """Under uvloop (what `optserve serve` runs), writing on a connection whose transport
    the peer already closed raised RuntimeError ("the handler is closed"), which became a
    500 when a cluster node was killed mid-stream; our clients raise redis-py's
    ConnectionError (503, retried or re-routed) and the next command reconnects."""
    import asyncio

    import uvloop

    from optserve.store.clients import make_redis

    async def run() -> str:
        client = make_redis(redis_url, 5.0, 4)
        try:
            conn = await client.connection_pool.get_connection()
            await conn.send_command("PING")
            assert await conn.read_response() == b"PONG"
            conn._writer.transport.close()  # as a reset from the peer closes it
            await asyncio.sleep(0.05)
            with pytest.raises(redis.ConnectionError, match="connection was closed"):
                await conn.send_command("PING")
            await client.connection_pool.release(conn)
            return str(await client.ping())
        finally:
            await client.aclose()
            await client.connection_pool.disconnect()

    assert uvloop.run(run()) == "True"
