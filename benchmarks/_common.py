"""What the benchmarks share: the machine's description and a private optserve to time.

The private server runs its Redis the way `deploy/` does (deploy/redis.conf: append-only,
``appendfsync everysec``, no snapshots, the same rewrite thresholds) unless told otherwise,
so a figure is never a durable service's figure measured without durability.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optserve.local import wait_live
from optserve.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_REDIS_CONF = ROOT / "deploy" / "redis.conf"
# Redis's own default snapshot schedule (redis.conf as shipped): "snapshots only" below.
RDB_SAVE = "3600 1 300 100 60 10000"
# deploy/redis.conf lines that only make sense inside the compose network.
_NOT_LOCAL = {"bind", "protected-mode", "port", "dir"}


@dataclass(frozen=True)
class Persistence:
    """One Redis persistence setting and what it promises about acknowledged steps."""

    appendonly: bool
    appendfsync: str
    save: str
    process_crash: str
    machine_crash: str


PERSISTENCE: dict[str, Persistence] = {
    "aof-always": Persistence(True, "always", "", "nothing lost", "nothing lost"),
    "aof-everysec": Persistence(True, "everysec", "", "nothing lost",
                                "up to ~1 s of steps (2 s if the disk stalls)"),
    "rdb": Persistence(False, "everysec", RDB_SAVE, "everything since the last snapshot",
                       "everything since the last snapshot"),
    "none": Persistence(False, "everysec", "", "every session", "every session"),
}


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> str:
    """The 1/5/15-minute load averages: the machine may be shared, so every run says."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def deploy_redis_args() -> list[str]:
    """deploy/redis.conf as ``--name value`` arguments, less its network and data-dir lines."""
    args: list[str] = []
    for raw in DEPLOY_REDIS_CONF.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name.lower() in _NOT_LOCAL:
            continue
        value = value.strip()
        args += [f"--{name}", "" if value == '""' else value]
    return args


@dataclass
class PrivateServer:
    """A running private optserve: its URL, its Redis and the persistence it runs with."""

    url: str
    redis: EmbeddedRedis
    persistence: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def info(self) -> dict[str, Any]:
        """Redis's INFO persistence and stats sections, merged."""
        client = self.redis.client()
        try:
            return {**client.info("persistence"), **client.info("stats")}
        finally:
            client.close()

    def describe(self) -> str:
        """One line: the persistence and the Redis settings that decide its cost."""
        client = self.redis.client()
        try:
            cfg: dict[str, str] = {}
            for key in ("appendonly", "appendfsync", "save", "auto-aof-rewrite-percentage",
                        "auto-aof-rewrite-min-size", "aof-use-rdb-preamble"):
                cfg.update(client.config_get(key))
            version = client.info("server")["redis_version"]
        finally:
            client.close()
        min_size = int(cfg["auto-aof-rewrite-min-size"]) >> 20
        return (f"persistence {self.persistence} (redis {version}: appendonly "
                f"{cfg['appendonly']}, appendfsync {cfg['appendfsync']}, save "
                f"\"{cfg['save']}\", auto-aof-rewrite {cfg['auto-aof-rewrite-percentage']}% "
                f"over {min_size} MiB, rdb preamble {cfg['aof-use-rdb-preamble']})")


@contextlib.contextmanager
def optserve_server(*, kernel: str = "exact", workers: int = 1,
                    persistence: str = "aof-everysec") -> Iterator[PrivateServer]:
    """A redis-server and `optserve serve` in child processes, started the way `optserve
    serve` starts them (Redis on a unix socket in a private data directory) with Redis
    configured as deploy/redis.conf, then ``persistence``; yields the server, stops both."""
    mode = PERSISTENCE[persistence]
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as tmp:
        redis = EmbeddedRedis(
            data_dir=tmp, unix_socket=True,
            extra_args=[*deploy_redis_args(), "--appendonly",
                        "yes" if mode.appendonly else "no", "--appendfsync", mode.appendfsync])
        with redis:
            client = redis.client()
            client.config_set("save", mode.save)  # a repeated --save does not override
            client.close()
            port = free_port()
            env = {**os.environ, "OPTSERVE_REDIS_URL": redis.url, "OPTSERVE_KERNEL": kernel,
                   "OPTSERVE_LOG_LEVEL": "warning", "OPTSERVE_WORKERS": str(workers)}
            env.pop("OPTSERVE_FUSED", None)
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from optserve.cli import main; "
                 "sys.exit(main())", "serve", "--port", str(port)], env=env, cwd=ROOT)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_live(url, 60.0, lambda: proc.poll() is None)
                yield PrivateServer(url, redis, persistence)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
