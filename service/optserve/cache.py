"""This process's copy of sessions' tensors, so a step need not read them from Redis.

An entry is used only if it is the very commit Redis holds (version and commit nonce, see
``StepTxn.execute``); a step takes its entry out while it works and puts it back after the
response is sent, so no two steps ever share tensors.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from optserve_client.wire import WireTensor

from . import metrics
from .session import SessionMeta

# How long a step waits for a slow reader's response to let go of the tensors it was sent
# from before it rebuilds the session from Redis instead (a reader never stalls a session).
LENT_WAIT_S = 1.0


@dataclass
class Loaded:
    """One session's tensors at one version, as torch tensors on the compute device."""

    version: int
    params: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    nbytes: int = 0
    nonce: str | None = None  # the commit that wrote this version (see StepTxn.commit)
    # What a one-round-trip step needs to know (hot_step.py), set by the commit that made
    # this version: the session document it was computed with, and the log since the last
    # checkpoint (a background checkpoint may only have shortened it).
    meta: SessionMeta | None = None
    log_steps: int | None = None
    log_bytes: int = 0
    # name -> (tensor, its address, a WireTensor over its memory): see `wire_params`.
    views: dict[str, tuple[torch.Tensor, int, WireTensor]] = field(
        default_factory=dict, repr=False, compare=False)
    # The native kernel's settled calls for these tensors (optim/native_fast.py).
    kernel_memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    # Set once the response that sent these parameters from their own memory is wholly
    # with the kernel (api/tensors.py): until then nothing may change them in place.
    sending: asyncio.Event | None = field(default=None, repr=False, compare=False)

    async def settled(self, timeout_s: float = LENT_WAIT_S) -> bool:
        """Whether the parameters may be changed: no response still holds their bytes, or
        it let go within `timeout_s`. False: a reader is slow; the caller leaves these
        tensors to that response and rebuilds the session from Redis instead."""
        if self.sending is None or self.sending.is_set():
            self.sending = None
            return True
        try:
            await asyncio.wait_for(self.sending.wait(), timeout_s)
        except TimeoutError:
            return False
        self.sending = None
        return True

    def wire_params(self) -> Mapping[str, WireTensor | torch.Tensor]:
        """The parameters for a response body: CPU tensors as WireTensors over their own
        memory, kept between steps (the update is in place, so a view stays valid; a
        tensor replaced or moved is viewed afresh). Encoding then skips torch's per-tensor
        calls, which cost more than a small step's update."""
        out: dict[str, WireTensor | torch.Tensor] = {}
        views = self.views
        for name, t in self.params.items():
            kept = views.get(name)
            if kept is not None and kept[0] is t and kept[1] == t.data_ptr():
                out[name] = kept[2]
            elif t.device.type == "cpu" and t.is_contiguous() and t.dtype in _VIEWABLE:
                view = WireTensor(_VIEWABLE[t.dtype], tuple(t.shape),
                                  memoryview(t.detach().numpy()).cast("B"))
                views[name] = (t, t.data_ptr(), view)
                out[name] = view
            else:
                out[name] = t
        return out

    def count_bytes(self) -> None:
        self.nbytes = sum(nbytes(t) for t in self.params.values()) + sum(
            nbytes(t) for s in self.state.values() for t in s.values())


_VIEWABLE = {torch.float32: "float32", torch.float64: "float64"}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorCache:
    """A per-process LRU of sessions' tensors, bounded in bytes, keyed by session id."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.Lock()
        # What the gauges say. They are brought up to date when an entry comes back or goes
        # for good, not when a step takes one out for a moment (two shared-file writes
        # fewer each way): a session's tensors count while a step has them.
        self._reported = (0, 0)

    def _report(self) -> None:
        now = (self._bytes, len(self._items))
        if now != self._reported:
            metrics.CACHE_BYTES.inc(now[0] - self._reported[0])
            metrics.CACHE_ENTRIES.inc(now[1] - self._reported[1])
            self._reported = now

    def put(self, sid: str, item: Loaded) -> None:
        with self._mutex:
            self._remove(sid)
            if item.nbytes > self.limit:
                self._report()
                return
            self._items[sid] = item
            self._bytes += item.nbytes
            while self._bytes > self.limit and self._items:
                oldest = next(iter(self._items))
                self._remove(oldest)
                metrics.CACHE.labels("evicted").inc()
            self._report()

    def take(self, sid: str, version: int, nonce: str | None) -> Loaded | None:
        """Remove and return the entry: the caller owns those tensors until it puts them back."""
        with self._mutex:
            item = self._items.get(sid)
            if item is None:
                metrics.CACHE.labels("miss").inc()
                return None
            self._remove(sid)
            hit = (item.version, item.nonce) == (version, nonce)
            metrics.CACHE.labels("hit" if hit else "miss").inc()
            return item if hit else None

    def take_any(self, sid: str) -> Loaded | None:
        """Remove and return the entry whatever its version (a hot step checks it in Redis
        at commit time, see hot_step.py)."""
        with self._mutex:
            item = self._items.get(sid)
            if item is not None:
                self._remove(sid)
            return item

    def holds(self, sid: str) -> bool:
        """Whether an entry is here now (a hint: it may be taken before it is used)."""
        return sid in self._items

    def drop(self, sid: str) -> None:
        with self._mutex:
            self._remove(sid)
            self._report()

    def _remove(self, sid: str) -> None:
        item = self._items.pop(sid, None)
        if item is not None:
            self._bytes -= item.nbytes
