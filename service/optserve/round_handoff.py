"""Rounds this process closed, handed to its own waiters from memory.

The closer of a sync round commits the round's outcome and new parameters to Redis for
every process's waiters; the waiters in the closer's own process take them from here
instead of reading them back (one read of the outcome and one of the parameters fewer per
waiter). A waiter woken while the closer's commit is still in flight waits for it, then
looks: an entry exists only for a commit that landed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from optserve_client.wire import WireTensor

Closed = tuple[dict[str, Any], dict[str, WireTensor]]  # the outcome, the parameters

KEEP = 64  # rounds remembered; a waiter of an older one reads Redis, as others do


class RoundHandoff:
    def __init__(self) -> None:
        self.closed: OrderedDict[str, Closed] = OrderedDict()
        self.closing: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def committing(self, token: str) -> AsyncIterator[None]:
        """Around the close's commit: waiters of `token` wait for it to end."""
        event = self.closing[token] = asyncio.Event()
        try:
            yield
        finally:
            self.closing.pop(token, None)
            event.set()

    def record(self, token: str, version: int, params: dict[str, WireTensor]) -> None:
        """Round `token` closed here and made `version` with `params` (copies)."""
        self.closed[token] = ({"status": "closed", "version": version}, params)
        while len(self.closed) > KEEP:
            self.closed.popitem(last=False)

    async def get(self, token: str) -> Closed | None:
        """Round `token`'s outcome and parameters if this process closed it."""
        event = self.closing.get(token)
        if event is not None:
            await event.wait()
        return self.closed.get(token)
