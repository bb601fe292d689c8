"""What the benchmarks share: the machine's description and a private optserve to time."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from optserve.local import wait_live
from optserve.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@contextlib.contextmanager
def optserve_server(*, fused: str = "on", workers: int = 1) -> Iterator[str]:
    """A redis-server (AOF off: timing the service, not the disk) and `uvicorn` optserve in
    child processes; yields the base URL and stops both."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(data_dir=tmp,
                                                             appendonly=False) as redis:
        port = free_port()
        env = {**os.environ, "OPTSERVE_REDIS_URL": redis.url, "OPTSERVE_FUSED": fused,
               "OPTSERVE_LOG_LEVEL": "warning"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "optserve.app:app_factory", "--factory",
             "--port", str(port), "--log-level", "warning", "--workers", str(workers)],
            env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_live(url, 60.0, lambda: proc.poll() is None)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
