"""The exact path's blocking: torch's own ops, applied one cache-sized block at a time.

SGD's exact path, and RMSprop's and AdaGrad's until (or where never) their native kernel
is ready (:mod:`optserve.optim.native`, the same bits in one C++ pass).

Why: torch's CPU step runs 5-9 elementwise ops per tensor, each a full pass over memory.
Run on a ~1 MiB slice of every tensor instead, all of a step's ops on that slice before the
next, the slice stays in cache and main memory is read and written about once per tensor.

Why it is still bitwise equal to torch: every op involved is elementwise, and an ATen CPU
kernel's result for an element depends neither on where the element sits in the tensor
(vectorized body or scalar tail, aligned or not, which thread's chunk) nor on its
neighbours; ``tests/test_optim_conformance.py`` checks this at sizes around the block size.
So running the very ops of ``_single_tensor_<x>``, with the very same Python scalars, on
slices gives the same bits as running them on the whole tensor.

Blocking applies to contiguous CPU tensors over one block with state of the same shape,
dtype and layout; everything else (0-dim, empty, small, non-contiguous, other devices) runs
the same ops once on the whole tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .base import flat_ok

BLOCK_BYTES = 1 << 20
"""Bytes of one tensor per block: 256 Ki float32 or 128 Ki float64 elements. Measured best
on a 2-core AVX2 machine (1 MiB L2 per core, 16 MiB L3) among 64 Ki..1 Mi float32 elements:
smaller blocks pay ATen's per-op overhead (~3-5 us) too often, larger ones spill the cache.
"""


def block_numel(t: Tensor) -> int:
    """Elements per block for ``t``'s dtype."""
    return max(1024, BLOCK_BYTES // t.element_size())


def blockable(param: Tensor, *state: Tensor | None) -> bool:
    """Whether ``param`` and its state tensors can be cut into 1-D slices alike."""
    return (param.device.type == "cpu" and param.numel() > block_numel(param)
            and flat_ok(param, *state))


def scratch(param: Tensor) -> Tensor | None:
    """One block of working memory for an op's result (``out=``), reused block after block
    so the temporaries torch allocates per tensor neither allocate nor leave the cache."""
    if not blockable(param):
        return None
    return torch.empty(block_numel(param), dtype=param.dtype)


def blocks(param: Tensor, grad: Tensor, *state: Tensor | None
           ) -> Iterator[tuple[Tensor | None, ...]]:
    """``(param, grad, *state)`` as matching 1-D slices, one block at a time; or the whole
    tensors once where blocking does not apply (see :func:`blockable`). None stays None.

    The gradient is flattened with ``reshape`` (a copy only when it is not contiguous:
    same values, and elementwise results do not depend on layout).
    """
    if not blockable(param, *state):
        yield (param, grad, *state)
        return
    n = param.numel()
    size = block_numel(param)
    flats = [param.view(-1), grad.reshape(-1)] + [None if t is None else t.view(-1)
                                                  for t in state]
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield tuple(None if t is None else t[start:stop] for t in flats)
