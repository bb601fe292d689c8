"""The tensor cache's gauges follow what it holds once entries come back or go."""

from __future__ import annotations

import torch

from optserve import metrics
from optserve.cache import Loaded, TensorCache


def _gauges() -> tuple[float, float]:
    return (metrics.CACHE_BYTES._value.get(), metrics.CACHE_ENTRIES._value.get())


def _item(n: int) -> Loaded:
    item = Loaded(1, {"w": torch.zeros(n)}, {"w": {"square_avg": torch.zeros(n)}})
    item.count_bytes()
    return item


def test_gauges_follow_puts_drops_and_evictions_not_loans() -> None:
    b0, e0 = _gauges()
    cache = TensorCache(limit_bytes=1000)
    a, b = _item(50), _item(60)  # 400 and 480 bytes
    cache.put("a", a)
    cache.put("b", b)
    assert _gauges() == (b0 + 880, e0 + 2)
    out = cache.take_any("a")  # on loan to a step: still counted
    assert out is a and _gauges() == (b0 + 880, e0 + 2)
    cache.put("a", out)  # back: unchanged, nothing written
    assert _gauges() == (b0 + 880, e0 + 2)
    assert cache.take_any("b") is b  # taken, then dropped for good (a failed step)
    cache.drop("b")
    assert _gauges() == (b0 + 400, e0 + 1)
    cache.put("c", _item(100))  # 800 bytes: evicts "a"
    assert _gauges() == (b0 + 800, e0 + 1)
    cache.put("d", _item(1000))  # too large to keep at all
    assert _gauges() == (b0 + 800, e0 + 1)
    cache.drop("c")
    assert _gauges() == (b0, e0)
