"""Keeps a child process from outliving us, however we die (SIGKILL included).

A tiny watchdog process holds the read end of a pipe whose write end only we hold. When we
exit or are killed, the kernel closes the write end; the watchdog reads EOF and SIGTERMs the
child (SIGTERM, not SIGKILL: Redis still flushes and fsyncs its append-only file). A clean
stop writes one byte first, so the watchdog exits without signalling a pid that may already
have been reused. Works on any POSIX system and from any thread.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

__all__ = ["Watchdog"]

_SCRIPT = """
import os, signal, sys
data = sys.stdin.buffer.read(1)
if not data:
    try:
        os.kill(int(sys.argv[1]), signal.SIGTERM)
    except OSError:
        pass
"""


class Watchdog:
    """SIGTERMs ``pid`` when this process goes away without calling :meth:`release`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-S", "-c", _SCRIPT, str(pid)],
            stdin=subprocess.PIPE,  # the pipe: non-inheritable, so no other child holds it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the terminal must not take it down first
            close_fds=True,
        )

    def release(self) -> None:
        """The child was stopped cleanly: let the watchdog exit without signalling."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(b"x")
            proc.stdin.close()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
