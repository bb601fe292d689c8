"""Shared fixtures: a real redis-server, and the real HTTP stack (uvicorn) in front of the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from optserve.local import wait_live
from optserve.store.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the whole run (tests use their own sessions/keys)."""
    server = EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


def wait_until_live(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None
                    ) -> None:
    wait_live(url, timeout, (lambda: proc.poll() is None) if proc is not None else None)


@dataclass
class ThreadServer:
    """uvicorn serving create_app(settings) from a thread of the test process."""

    url: str
    server: Any
    thread: threading.Thread
    app: Any = None

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_thread_server(**settings: Any) -> ThreadServer:
    import uvicorn

    from optserve.api.http_protocol import protocol_class
    from optserve.app import create_app
    from optserve.settings import Settings

    port = free_port()
    app = create_app(Settings(**settings))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", http=protocol_class("httptools"))  # as serve runs
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_live(url)
    return ThreadServer(url, server, thread, app)


@pytest.fixture(scope="session")
def live_server(redis_url: str) -> Iterator[str]:
    """Base URL of an open (no API keys) optserve on the real HTTP stack, the exact kernel."""
    srv = start_thread_server(redis_url=redis_url, kernel="exact", lock_timeout_s=5.0)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="session")
def fused_server(redis_url: str) -> Iterator[str]:
    """The same, with the opt-in torch.compile'd kernel."""
    srv = start_thread_server(redis_url=redis_url, kernel="compiled", lock_timeout_s=5.0)
    # torch.compiler.is_compiling() is one flag for the whole process, True while any thread
    # compiles: torch.optim's own Adagrad then computes its decayed lr in float32 tensors.
    # The tests' local reference runs in this process, so it must not overlap the server's
    # start-up compile (the probe, in the background).
    for thread in threading.enumerate():
        if thread.name == "optserve-probe":
            thread.join(timeout=600)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="session")
def keyed_server(redis_url: str) -> Iterator[str]:
    """A server with two tenants: alice (key ka) and bob (key kb)."""
    srv = start_thread_server(redis_url=redis_url, kernel="exact", api_keys="alice:ka,bob:kb")
    yield srv.url
    srv.stop()


@dataclass
class ProcessServer:
    """`python -m uvicorn` in a child process, for multi-process and crash tests."""

    url: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def make_server(redis_url: str) -> Iterator[Any]:
    """Factory: start optserve processes (env as OPTSERVE_* settings); all stopped at teardown."""
    started: list[ProcessServer] = []

    def start(**env: Any) -> ProcessServer:
        port = free_port()
        full = {**os.environ, "OPTSERVE_REDIS_URL": redis_url, "OPTSERVE_KERNEL": "exact",
                "OPTSERVE_LOG_LEVEL": "warning"}
        full.update({f"OPTSERVE_{k.upper()}": str(v) for k, v in env.items()})
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "optserve.app:app_factory", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=full, cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}"
        srv = ProcessServer(url, proc, full)
        started.append(srv)
        wait_until_live(url, proc=proc)
        return srv

    yield start
    for srv in started:
        srv.stop()
