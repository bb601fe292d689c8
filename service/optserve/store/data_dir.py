"""Guards on a redis-server's data directory: one owner at a time, never an older server.

Two servers appending to the same append-only files corrupt them, and a redis-server older
than the one that wrote a directory does not read it (6.2 ignores 7.0's ``appendonlydir/``)
and starts empty instead: the service would come up with every session gone. Both are
refused here, before a server is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .redis_binary import Version, format_version, parse_version

__all__ = [
    "LOCK_NAME",
    "VERSION_NAME",
    "DataDirError",
    "DataDirLocked",
    "DataWrittenByNewer",
    "check_readable_by",
    "lock_data_dir",
    "record_version",
    "written_by",
]

LOCK_NAME = "optserve.lock"
VERSION_NAME = "redis-version"
# Redis 7.0 replaced the single appendonly.aof by a multi-part appendonlydir/: data that
# predates the version file but has one was written by 7.0 or newer.
_MULTIPART_AOF = ("appendonlydir", (7, 0, 0))


class DataDirError(RuntimeError):
    """The data directory cannot be opened; the message says why and what to do."""


class DataDirLocked(DataDirError):
    """Another live process holds the directory's lock; ``pid`` is its id (None: unknown)."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir, self.pid = data_dir, pid
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"data directory {data_dir} is locked by another running process "
                         f"({who})")


class DataWrittenByNewer(DataDirError):
    """The directory's data was written by a newer redis-server than the one chosen."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the directory's exclusive lock and write our pid into it; returns the lock's fd.

    The lock (``flock``) lasts as long as any process holds that fd open: the caller and, if
    the fd is passed on, the redis-server it starts. A process that dies releases it.
    """
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirLocked(data_dir, _read_pid(path)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def written_by(data_dir: Path) -> Version | None:
    """The version of the redis-server that last wrote ``data_dir``, if known."""
    with contextlib.suppress(OSError):
        found = parse_version((data_dir / VERSION_NAME).read_text())
        if found:
            return found
    name, version = _MULTIPART_AOF
    return version if (data_dir / name).is_dir() else None


def check_readable_by(data_dir: Path, binary: str, version: Version | None) -> None:
    """Refuse a server older than the one that wrote ``data_dir``."""
    wrote = written_by(data_dir)
    if wrote is None or version is None or version >= wrote:
        return
    raise DataWrittenByNewer(
        f"the data in {data_dir} was written by redis-server {format_version(wrote)}, and "
        f"{binary} is {format_version(version)}, which would not read it (the service would "
        f"start with no sessions). Run redis-server >= {format_version(wrote)} "
        "(OPTSERVE_REDIS_SERVER=/path/to/redis-server), or use another OPTSERVE_DATA_DIR."
    )


def record_version(data_dir: Path, version: Version) -> None:
    """Note which redis-server version now owns the files (it may have upgraded them)."""
    path = data_dir / VERSION_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(format_version(version) + "\n")
    os.replace(tmp, path)
