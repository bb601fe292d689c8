"""`optserve serve` (with a Redis of its own when none is configured) and `optserve demo`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .startup import ConfigError, check, load_settings

if TYPE_CHECKING:
    from .settings import Settings
    from .store.embedded import EmbeddedRedis

log = logging.getLogger("optserve")


def _say(message: str) -> None:
    print(f"optserve: {message}", file=sys.stderr, flush=True)


def version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("optserve")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def start_embedded_redis(settings: Settings) -> tuple[EmbeddedRedis | None, int]:
    """Start the private redis-server on ``settings.data_dir``: (server, 0), or (None, exit
    code) after saying why it cannot start."""
    from .store.data_dir import DataDirLocked, DataWrittenByNewer
    from .store.embedded import EmbeddedRedis, EmbeddedRedisError, RedisServerNotFound

    data_dir = settings.data_dir.resolve()
    _say(f"DATA DIRECTORY {data_dir} (OPTSERVE_DATA_DIR; a relative path is taken from the "
         "current directory)")
    embedded = EmbeddedRedis(data_dir=data_dir, binary=settings.redis_server,
                             unix_socket=hasattr(socket, "AF_UNIX"))
    try:
        embedded.start()
    except RedisServerNotFound as exc:
        _say(str(exc))
        return None, 2
    except DataDirLocked as exc:
        who = f"pid {exc.pid}" if exc.pid else "pid unknown"
        _say(f"data directory {data_dir} is locked by another running `optserve serve` "
             f"({who}): stop that one, or set OPTSERVE_DATA_DIR to another directory")
        return None, 1
    except (DataWrittenByNewer, EmbeddedRedisError) as exc:
        _say(f"cannot start redis-server: {exc}")
        return None, 1
    finally:
        if not embedded.running:
            embedded.stop()
    found = ".".join(map(str, embedded.version)) if embedded.version else "version unknown"
    _say(f"started redis-server {found} ({embedded.binary}) at {embedded.url}, append-only "
         f"persistence in {data_dir} (set OPTSERVE_REDIS_URL to use your own Redis)")
    return embedded, 0


# Not imported from optserve.metrics: importing that module fixes where values are kept.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir() -> tuple[str, bool]:
    """Prometheus's multiprocess directory: ``PROMETHEUS_MULTIPROC_DIR`` if set (its old
    values wiped), else a private temporary one. Returns (path, whether it is ours)."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("*.db"):  # a previous run's values are not this run's
            old.unlink()
        return str(path), False
    path = Path(tempfile.mkdtemp(prefix="optserve-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    return str(path), True


def _drop_metrics_dir(directory: str | None, ours: bool) -> None:
    if ours and directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == directory:
            del os.environ[MULTIPROC_ENV]


def fast_io() -> dict[str, Any]:
    """uvloop and httptools when installed (less work per request than asyncio's own loop
    and the pure-Python h11 parser), else those two: uvicorn's choice, made explicit. The
    HTTP protocol is uvicorn's, with no write buffer (`api/http_protocol.py`: a response's
    tensors are never handed back while the transport still holds their bytes)."""
    import importlib.util

    from .api.http_protocol import protocol_class

    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    return {"loop": "uvloop" if have("uvloop") else "asyncio",
            "http": protocol_class("httptools" if have("httptools") else "h11")}


# OpenMP's threads (torch's and the native kernel's) spin for a while after each parallel
# region by default. In a server that shares its cores with Redis and the HTTP stack that
# spinning took half its CPU at 1e6 elements and slowed steps (README, Performance).
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def omp_defaults(environ: MutableMapping[str, str]) -> None:
    """The server's OpenMP settings, unless the user set them; before torch is imported."""
    for name, value in OMP_DEFAULTS.items():
        environ.setdefault(name, value)


def serve(args: argparse.Namespace) -> int:
    omp_defaults(os.environ)
    import uvicorn

    from . import logs

    try:
        settings = load_settings()
        check(settings)
    except ConfigError as exc:
        print(f"optserve: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings)
    # Before anything imports optserve.metrics: every worker writes to this directory and
    # any worker's /metrics reads them all. One worker keeps its values in memory (a shared
    # file write per value costs ~2 us; a small step updates ~20), unless the variable is set.
    workers = args.workers or settings.workers
    directory, ours = (metrics_dir() if workers > 1 or os.environ.get(MULTIPROC_ENV)
                       else (None, False))
    embedded: EmbeddedRedis | None = None
    if not settings.redis_given:
        embedded, code = start_embedded_redis(settings)
        if embedded is None:
            _drop_metrics_dir(directory, ours)
            return code
        os.environ["OPTSERVE_REDIS_URL"] = embedded.url
        settings = load_settings()
    host = args.host or settings.host
    metrics_server = None
    try:
        if settings.metrics_port is not None:
            from .api.scrape import serve_metrics_port

            metrics_server = serve_metrics_port(settings, host)
        uvicorn.run(
            "optserve.app:app_factory",
            factory=True,
            host=host,
            port=args.port or settings.port,
            workers=workers,
            log_level=settings.log_level,
            log_config=logs.uvicorn_log_config(settings),
            access_log=False,  # the app logs one line per request, with its request id
            proxy_headers=True,
            **fast_io(),
        )
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if embedded is not None:
            embedded.stop()
        _drop_metrics_dir(directory, ours)
    return 0


def demo(args: argparse.Namespace) -> int:
    from .demos import main as demo_main

    return demo_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"optserve {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the HTTP service")
    p.add_argument("--host", default=None, help="default: OPTSERVE_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: OPTSERVE_PORT or 8000")
    p.add_argument("--workers", type=int, default=None, help="default: OPTSERVE_WORKERS or 1")
    p.set_defaults(func=serve)
    d = sub.add_parser("demo", help="the RMSprop document's demonstrations, through the service")
    d.add_argument("which", choices=["quadratic", "ill-conditioned", "vs-adagrad", "centered",
                                     "all"])
    d.add_argument("--url", default=None, help="a running service (default: start one here)")
    d.add_argument("--plot", default=None, metavar="DIR", help="write PNG figures to DIR")
    d.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
