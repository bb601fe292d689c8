"""Request bodies into reused buffers whose pages are already mapped.

A fresh multi-megabyte buffer costs a page fault per 4 KiB the first time it is written
(a 4 MB body: ~1000 faults, more than the copy itself). Bodies of at least `MIN_POOLED`
bytes are read into power-of-two buffers kept here between requests, so a steady stream of
steps writes into memory that is already mapped.

Memory still follows the bytes that arrived: a body starts in the smallest class that holds
its first chunk and moves to the next class only when it outgrows it (at most twice what
arrived, as a growing bytearray is). A buffer goes back to the pool when its request is over,
and only if nothing still points into it (no live view: a resize would fail; no other
reference); the pool keeps at most `max_bytes` in all.
"""

from __future__ import annotations

import sys

MIN_POOLED = 64 * 1024
PER_CLASS = 4


class BodyPool:
    """Free buffers by size class (powers of two). One event loop: no lock needed."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kept = 0
        self.free: dict[int, list[bytearray]] = {}

    def take(self, at_least: int, kept_only: bool = False) -> bytearray | None:
        """A buffer of length exactly its class (>= `at_least`): a kept one if any, else a
        new one (None with `kept_only`)."""
        size = max(MIN_POOLED, 1 << (at_least - 1).bit_length())
        kept = self.free.get(size)
        if kept:
            self.kept -= size
            return kept.pop()
        return None if kept_only else bytearray(size)

    def give(self, buf: bytearray) -> None:
        """Keep `buf` for a later body if nothing else holds it and there is room."""
        used = len(buf)
        if used <= MIN_POOLED // 2:
            return
        size = 1 << (used - 1).bit_length()
        # 3: `buf`, this frame's argument and getrefcount's own; anything more is a holder.
        if sys.getrefcount(buf) > 3 or size > self.max_bytes:
            return
        kept = self.free.setdefault(size, [])
        if len(kept) >= PER_CLASS or self.kept - self._smaller(size) + size > self.max_bytes:
            return
        try:
            buf.extend(bytes(size - used))  # back to its class: fails while views exist
        except BufferError:
            return
        self._evict_below(size, room=size)
        kept.append(buf)
        self.kept += size

    def _smaller(self, size: int) -> int:
        return sum(cls * len(bufs) for cls, bufs in self.free.items() if cls < size)

    def _evict_below(self, size: int, room: int) -> None:
        """Drop kept buffers of smaller classes, smallest first, until `room` fits: a body
        that grew through the small classes gives them back on its way, and without this
        they would crowd out the one buffer that holds the whole body next time."""
        for cls in sorted(c for c in self.free if c < size):
            bufs = self.free[cls]
            while bufs and self.kept + room > self.max_bytes:
                bufs.pop()
                self.kept -= cls


class BodyReader:
    """One request's body, appended chunk by chunk into pooled buffers."""

    def __init__(self, pool: BodyPool, declared: int) -> None:
        self.pool = pool
        # A kept buffer for the whole declared body, if the pool has one: it holds that
        # memory already, so taking it costs none more than what arrived.
        self.buf = pool.take(declared, kept_only=True)
        self.n = 0

    def add(self, chunk: bytes) -> None:
        end = self.n + len(chunk)
        if self.buf is None or end > len(self.buf):
            old, self.buf = self.buf, self.pool.take(end)
            assert self.buf is not None
            if old is not None:
                self.buf[:self.n] = memoryview(old)[:self.n]
                self.pool.give(old)
        self.buf[self.n:end] = chunk
        self.n = end

    def release(self) -> None:
        """The request is over: the buffer goes back (if nothing holds it still)."""
        old, self.buf = self.buf, None
        if old is not None:
            self.pool.give(old)

    def body(self) -> bytearray:
        """The body, exactly as long as what arrived (a shrink within the buffer's class:
        in place, its pages kept)."""
        buf = self.buf
        if buf is None:
            return bytearray()
        del buf[self.n:]
        return buf
