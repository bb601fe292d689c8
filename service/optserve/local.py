"""A throwaway optserve in this process: a private redis-server plus the app under uvicorn.

`optserve demo` with no ``--url`` uses it so that every optimizer step still goes through
the real HTTP stack and Redis, without the user running anything first.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from .settings import Settings
from .store.embedded import EmbeddedRedis, free_port

__all__ = ["local_service"]


class _DropOpenWarning(logging.Filter):
    """The app warns that it runs without API keys; this one listens on loopback only and
    lives as long as the caller, so the warning would only alarm a demo's reader."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("no API keys configured")


def wait_live(url: str, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Poll ``/livez`` until it answers 200; fail early once ``alive()`` says the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the local optserve at {url} exited during start-up")
        try:
            if httpx.get(f"{url}/livez", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the local optserve at {url} did not come up in {timeout:.0f} s")


@contextlib.contextmanager
def local_service(*, timeout: float = 60.0, log_level: str = "warning",
                  **settings: Any) -> Iterator[str]:
    """Start redis-server (temporary data dir) and the app on a free loopback port; yield
    the base URL; stop both on exit.

    ``settings`` are extra `Settings` fields; the kernel is the exact default (compiling
    costs more than toy-sized demos ever save).
    """
    import uvicorn

    from .app import create_app

    quiet = _DropOpenWarning()
    app_log = logging.getLogger("optserve")
    app_log.addFilter(quiet)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="optserve-local-") as data_dir, \
                EmbeddedRedis(data_dir=data_dir) as redis:
            try:
                options = {"kernel": "exact", "log_level": log_level, **settings}
                app = create_app(Settings(redis_url=redis.url, **options))
                port = free_port()
                config = uvicorn.Config(app, host="127.0.0.1", port=port,
                                        log_level=log_level, lifespan="on")
                server = uvicorn.Server(config)
                thread = threading.Thread(target=server.run, name="optserve-local",
                                          daemon=True)
                thread.start()
                url = f"http://127.0.0.1:{port}"
                wait_live(url, alive=thread.is_alive, timeout=timeout)
                yield url
            finally:
                if server is not None and thread is not None:
                    server.should_exit = True
                    thread.join(timeout=10)
    finally:
        app_log.removeFilter(quiet)
