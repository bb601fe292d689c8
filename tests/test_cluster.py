"""Beyond one Redis: a real three-master Redis Cluster and a real Sentinel failover.

Sessions land on every shard; two tenants list only their own; steps come from two server
processes (one given the node list, one a URL naming a single node, detected as a cluster);
a sync round closes; delete frees everything; a node killed mid-stream gives 503s (never a
500), then everything resumes with nothing acknowledged lost. With Sentinel and
``MIN_REPLICAS_ACK=1``, a primary SIGKILLed mid-stream loses no acknowledged step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from redis_topologies import Cluster, SentinelSet, start_cluster, start_sentinels, wait_for

from optserve.store import keys

from helpers import create, decode, step

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LR = 0.5  # SGD with gradient 1: parameters after v steps are exactly -LR * v


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def sgd(c: httpx.Client, **extra) -> dict:
    return create(c, {"w": torch.zeros(4)}, optimizer="sgd", hyperparams={"lr": LR}, **extra)


def one_step(c: httpx.Client, sid: str, key: str | None = None) -> httpx.Response:
    return step(c, sid, {"w": torch.ones(4)}, {"idempotency-key": key} if key else None)


def test_sessions_on_every_shard_two_tenants_two_servers(cluster: Cluster, make_server) -> None:
    keyset = "alice:ka,bob:kb"
    a = make_server(redis_cluster_nodes=cluster.spec, api_keys=keyset)
    b = make_server(redis_url=cluster.nodes[1].url, api_keys=keyset)  # detected as a cluster
    for srv in (a, b):
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
    ca = httpx.Client(base_url=a.url, timeout=30, headers={"authorization": "Bearer ka"})
    cb = httpx.Client(base_url=b.url, timeout=30, headers={"authorization": "Bearer ka"})
    bob = httpx.Client(base_url=b.url, timeout=30, headers={"authorization": "Bearer kb"})
    alice_ids = [sgd(ca if i % 2 else cb)["id"] for i in range(12)]
    bob_ids = [sgd(bob)["id"] for _ in range(3)]
    shards = {cluster.node_for(keys.tensors(s)).port for s in alice_ids}
    assert len(shards) == 3, "twelve sessions should land on all three shards"

    listed = {s["id"] for s in ca.get("/v1/sessions").json()["sessions"]}
    assert listed == set(alice_ids)
    assert {s["id"] for s in bob.get("/v1/sessions").json()["sessions"]} == set(bob_ids)
    for sid in bob_ids:  # another tenant's session, wherever it lives: 404
        assert ca.get(f"/v1/sessions/{sid}").status_code == 404
    assert cb.get("/v1/sessions/no-such-session").status_code == 404

    for sid in alice_ids:  # steps from both processes, alternating, with idempotency keys
        for i in range(4):
            r = one_step(ca if i % 2 else cb, sid, f"{sid}-{i}")
            assert r.status_code == 200, r.text
            assert r.headers["x-optserve-version"] == str(i + 1)
        replay = one_step(ca, sid, f"{sid}-3")  # a retry: the same version, nothing applied
        assert replay.headers["x-optserve-version"] == "4"
        got = decode(ca.get(f"/v1/sessions/{sid}/params"))["w"]
        assert torch.equal(got, torch.full((4,), -LR * 4))

    gone = alice_ids[0]
    assert ca.delete(f"/v1/sessions/{gone}").status_code == 204
    assert cb.get(f"/v1/sessions/{gone}").status_code == 404
    node = cluster.node_for(keys.tensors(gone)).client()
    assert node.keys(f"{keys.PREFIX}:{{s:{gone}}}:*") == []  # records and their set too
    assert gone not in {s["id"] for s in cb.get("/v1/sessions").json()["sessions"]}


def test_sync_round_across_two_servers(cluster: Cluster, make_server) -> None:
    a = make_server(redis_cluster_nodes=cluster.spec)
    b = make_server(redis_cluster_nodes=cluster.spec)
    with httpx.Client(base_url=a.url, timeout=60) as c:
        s = create(c, {"w": torch.zeros(4)}, optimizer="sgd", hyperparams={"lr": 1.0},
                   mode="sync", sync={"contributions": 2, "timeout_s": 30})
    out: list[httpx.Response] = []

    def push(url: str, g: float) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out.append(step(c, s["id"], {"w": torch.full((4,), g)}))

    threads = [threading.Thread(target=push, args=(u, g)) for u, g in ((a.url, 1.0),
                                                                         (b.url, 3.0))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200, 200], [r.text for r in out]
    for r in out:
        assert r.headers["x-optserve-version"] == "1"
        assert torch.equal(decode(r)["w"], torch.full((4,), -2.0))  # the mean, lr 1
    assert time.monotonic() - started < 10  # woken by the notification, not the timeout


def test_sync_round_woken_through_the_sessions_shard_channel(cluster: Cluster,
                                                            make_server) -> None:
    """On a cluster a round is announced with SPUBLISH in the session's slot, to which the
    waiting server SSUBSCRIBEd: the waiter wakes at once, not at its once-a-second look."""
    a = make_server(redis_cluster_nodes=cluster.spec)
    b = make_server(redis_cluster_nodes=cluster.spec)
    with httpx.Client(base_url=a.url, timeout=60) as c:
        s = create(c, {"w": torch.zeros(4)}, optimizer="sgd", hyperparams={"lr": 1.0},
                   mode="sync", sync={"contributions": 2, "timeout_s": 30})
    channel = keys.round_channel(s["id"])
    owner = cluster.node_for(channel).client()
    listener = owner.pubsub()
    listener.ssubscribe(channel)
    done: dict[str, float] = {}
    out: dict[str, httpx.Response] = {}

    def push(url: str, g: float, name: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out[name] = step(c, s["id"], {"w": torch.full((4,), g)})
            done[name] = time.monotonic()

    first = threading.Thread(target=push, args=(a.url, 1.0, "first"))
    first.start()
    wait_for(lambda: owner.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 2, 30,
             "the waiting server subscribed to the session's shard channel")
    push(b.url, 3.0, "second")
    first.join()
    assert out["first"].status_code == out["second"].status_code == 200, out["first"].text
    assert torch.equal(decode(out["first"])["w"], torch.full((4,), -2.0))
    assert done["first"] - done["second"] < 0.75  # woken, not found by its 1 s look
    messages = []
    deadline = time.monotonic() + 5
    while not messages and time.monotonic() < deadline:
        m = listener.get_sharded_message(timeout=0.5)
        if m is not None and m["type"] == "smessage":
            messages.append(m)
    assert messages, "the closing server announced the round on the shard channel"
    for node in cluster.nodes:  # nobody listens on the unsharded channel any more
        assert node.client().execute_command("PUBSUB", "NUMSUB", keys.ROUNDS_CHANNEL)[1] == 0
    listener.close()


def test_node_killed_mid_stream_503_then_recovery(cluster: Cluster, make_server) -> None:
    srv = make_server(redis_cluster_nodes=cluster.spec, redis_timeout_s=1)
    c = httpx.Client(base_url=srv.url, timeout=30)
    sids = [sgd(c)["id"] for _ in range(9)]
    victim = cluster.node_for(keys.tensors(sids[0]))
    acked = {sid: 0 for sid in sids}
    statuses: list[int] = []
    stop = threading.Event()

    def stream(sid: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as cc:
            i = 0
            while not stop.is_set():
                r = one_step(cc, sid, f"{sid}-{i}")  # retried with its key until it lands
                statuses.append(r.status_code)
                if r.status_code == 200:
                    acked[sid] = int(r.headers["x-optserve-version"])
                    i += 1
                else:
                    assert r.status_code == 503, r.text
                    assert "retry-after" in r.headers
                    time.sleep(0.05)

    threads = [threading.Thread(target=stream, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    wait_for(lambda: min(acked.values()) >= 2, 30, "steps landing on every session")
    victim.process.kill()  # SIGKILL; appendfsync always: every acknowledged write is on disk
    victim.process.wait()
    time.sleep(1.0)
    assert httpx.get(f"{srv.url}/readyz").status_code == 503
    # Down past cluster-node-timeout: the others mark it failed and answer CLUSTERDOWN, on
    # which redis-py resets the client (the reset that used to close connections in use).
    survivor = next(n for n in cluster.nodes if n is not victim).client()
    wait_for(lambda: b"cluster_state:fail" in survivor.execute_command("CLUSTER", "INFO"), 20,
             "the cluster to see the node failed")
    time.sleep(1.0)  # steps meet CLUSTERDOWN for a while
    victim.start()
    cluster.wait_ok()
    before = dict(acked)
    wait_for(lambda: all(acked[s] > before[s] + 1 for s in sids), 30, "steps resuming")
    stop.set()
    for t in threads:
        t.join()
    assert 503 in statuses and 500 not in statuses
    assert httpx.get(f"{srv.url}/readyz").status_code == 200
    for sid in sids:
        r = c.get(f"/v1/sessions/{sid}/params")
        assert r.headers["x-optserve-version"] == str(acked[sid])  # nothing acked was lost
        assert torch.equal(decode(r)["w"], torch.full((4,), -LR * acked[sid]))


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = start_sentinels(tmp_path)
    yield s
    s.stop()


def test_sentinel_failover_loses_no_acknowledged_step(sentinels: SentinelSet,
                                                      make_server) -> None:
    srv = make_server(redis_sentinels=sentinels.spec, redis_sentinel_master=sentinels.master,
                      redis_min_replicas_ack=1, redis_timeout_s=1)
    c = httpx.Client(base_url=srv.url, timeout=30)
    sid = sgd(c)["id"]
    acked: list[int] = []
    statuses: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        while not stop.is_set():
            r = one_step(c, sid, f"k-{i}")
            statuses.append(r.status_code)
            if r.status_code == 200:
                acked.append(int(r.headers["x-optserve-version"]))
                i += 1
            else:
                assert r.status_code == 503, r.text
                time.sleep(0.05)

    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 5, 30, "steps landing")
        old = sentinels.primary.port
        sentinels.primary.process.kill()  # SIGKILL the primary mid-stream
        sentinels.primary.process.wait()
        wait_for(lambda: sentinels.current_primary_port() != old, 30, "a promotion")
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 5, 30, "steps after the promotion")
    finally:
        stop.set()
        t.join()
    assert 500 not in statuses
    assert acked == list(range(1, len(acked) + 1))  # one version per acknowledged step
    r = c.get(f"/v1/sessions/{sid}/params")
    assert int(r.headers["x-optserve-version"]) == acked[-1]  # every acked step is there
    assert torch.equal(decode(r)["w"], torch.full((4,), -LR * acked[-1]))
