"""Real Redis topologies for tests: a three-master Redis Cluster, and a primary with replicas
watched by three Sentinels, all run from the same redis-server binary as the other tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from optserve.store.embedded import EmbeddedRedis, free_port
from optserve.store.redis_binary import find_redis_server


def redis_cli() -> str:
    """redis-cli next to the redis-server the tests run."""
    server = Path(os.path.realpath(find_redis_server()))
    beside = server.with_name("redis-cli")
    found = str(beside) if beside.exists() else shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli not found next to redis-server")
    return found


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) fits in 16 bits and is free too."""
    while True:
        port = free_port()
        if port <= 55535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{what} within {timeout} s (last: {last!r})")


@dataclass
class Cluster:
    nodes: list[EmbeddedRedis]

    @property
    def spec(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def node_for(self, key: str) -> EmbeddedRedis:
        node = self.client().get_node_from_key(key)
        return next(n for n in self.nodes if n.port == int(node.port))

    def wait_ok(self, timeout: float = 30.0) -> None:
        def ok() -> bool:
            return all(n.client().execute_command("CLUSTER", "INFO").decode().find(
                "cluster_state:ok") >= 0 for n in self.nodes)
        wait_for(ok, timeout, "cluster_state:ok on every node")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_cluster(root: Path, masters: int = 3) -> Cluster:
    nodes = []
    for i in range(masters):
        d = root / f"node{i}"
        d.mkdir()
        nodes.append(EmbeddedRedis(
            data_dir=d, port=cluster_port(), appendfsync="always",
            extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "3000"]))
    for n in nodes:
        n.start()
    cluster = Cluster(nodes)
    subprocess.run([redis_cli(), "--cluster", "create",
                    *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-yes"],
                   check=True, capture_output=True, timeout=60)
    cluster.wait_ok()
    return cluster


@dataclass
class SentinelSet:
    primary: EmbeddedRedis
    replicas: list[EmbeddedRedis]
    sentinel_ports: list[int]
    procs: list[subprocess.Popen] = field(default_factory=list)
    master: str = "optserve"

    @property
    def spec(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def current_primary_port(self) -> int:
        c = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1)
        _, port = c.sentinel_get_master_addr_by_name(self.master)
        return int(port)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        for r in [self.primary, *self.replicas]:
            r.stop()


def start_sentinels(root: Path, replicas: int = 2) -> SentinelSet:
    (root / "primary").mkdir()
    primary = EmbeddedRedis(data_dir=root / "primary", port=free_port(), appendfsync="always")
    primary.start()
    reps = []
    for i in range(replicas):
        d = root / f"replica{i}"
        d.mkdir()
        r = EmbeddedRedis(data_dir=d, port=free_port(), appendfsync="always",
                          extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
        r.start()
        reps.append(r)
    wait_for(lambda: primary.client().info("replication")["connected_slaves"] == replicas,
             20, "replicas connected")
    ports = [free_port() for _ in range(3)]
    s = SentinelSet(primary, reps, ports)
    for i, port in enumerate(ports):
        conf = root / f"sentinel{i}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {root}\n"
            f"sentinel monitor {s.master} 127.0.0.1 {primary.port} 2\n"
            f"sentinel down-after-milliseconds {s.master} 1000\n"
            f"sentinel failover-timeout {s.master} 5000\n"
            f"sentinel parallel-syncs {s.master} 2\n")
        s.procs.append(subprocess.Popen(
            [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
    wait_for(lambda: all(redis.Redis(port=p, socket_timeout=1).sentinel_master(s.master)
                         ["num-other-sentinels"] == 2 for p in ports),
             30, "the sentinels to find one another")
    return s
