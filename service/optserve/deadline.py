"""Deadlines of whole seconds for the step path, without a timer per request.

`asyncio.timeout` schedules (and cancels) an event-loop timer on every entry: ~7 us in a
loop here, two per step (the body's read, the Redis batch), and more in place. The deadlines
on the step path are seconds long and only matter when something stalls, so `deadline`
registers the task in a per-loop set instead, and one sweep every `PERIOD` s (running only
while deadlines are being used) cancels the tasks that are past theirs. The cancellation is
turned into `TimeoutError` exactly as `asyncio.timeout` does it (a cancel from elsewhere
stays a cancel); a deadline fires up to `PERIOD` s late. Deadlines shorter than
`COARSE_FROM` s, and Python 3.10 (no `Task.uncancel`), use `asyncio.timeout` / anyio.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

import anyio

PERIOD = 0.1
COARSE_FROM = 1.0


class _Sweep:
    """One loop's registered deadlines and its sweeping timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.live: set[_Deadline] = set()
        self.used = False
        self.timer: asyncio.TimerHandle | None = None

    def add(self, d: _Deadline) -> None:
        self.live.add(d)
        self.used = True
        if self.timer is None:
            self.timer = self.loop.call_later(PERIOD, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        for d in [d for d in self.live if d.when <= now]:
            self.live.discard(d)
            d.expire()
        if self.used or self.live:
            self.used = False
            self.timer = self.loop.call_later(PERIOD, self.sweep)
        else:
            self.timer = None


_SWEEPS: dict[asyncio.AbstractEventLoop, _Sweep] = {}


class _Deadline:
    __slots__ = ("cancelling", "expired", "seconds", "sweep", "task", "when")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        sweep = _SWEEPS.get(loop)
        if sweep is None:
            sweep = _SWEEPS[loop] = _Sweep(loop)
            if len(_SWEEPS) > 64:  # closed loops (tests make many): forget them
                for old in [lp for lp in _SWEEPS if lp.is_closed()]:
                    del _SWEEPS[old]
        task = asyncio.current_task()
        assert task is not None, "deadline() needs a task"
        self.sweep, self.task, self.expired = sweep, task, False
        self.cancelling = task.cancelling()
        self.when = loop.time() + self.seconds
        sweep.add(self)

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.sweep.live.discard(self)
        if self.expired and self.task.uncancel() <= self.cancelling \
                and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc


@asynccontextmanager
async def _fallback(seconds: float) -> AsyncIterator[None]:
    with anyio.fail_after(seconds):
        yield


def deadline(seconds: float) -> AbstractAsyncContextManager[None]:
    """`async with deadline(s):` raises TimeoutError when the block runs past `s` seconds."""
    if sys.version_info < (3, 11):  # pragma: no cover - Python 3.10
        return _fallback(seconds)
    if seconds < COARSE_FROM:
        return asyncio.timeout(seconds)
    return _Deadline(seconds)
