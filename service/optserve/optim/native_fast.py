"""A cached session's RMSprop step as one native call per tensor, straight from the wire.

For every step `core.step` and `rmsprop.update` re-derive what a session's cached tensors
have already settled: that the native kernel takes them (device, dtype, layout, alignment,
which state exists) and the call's arguments; and the gradient becomes a torch tensor only
to be checked and have its address taken. At 1e4 elements that Python costs several times
the kernel (README, "Where the microseconds go"). `step` settles it once per set of
tensors (kept in the caller's `memo`, checked by identity and address on every use) and
makes exactly the calls `rmsprop.update` makes on that path: the same kernel, the same
arguments in the same order, ``step`` counted once per tensor. Where anything differs (the
kernel not ready, a gradient of another dtype or a read-only buffer, state to create, a
CUDA tensor) it returns None before changing anything, and the caller takes the general
path, which gives the same bits.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from . import native
from .base import ParamState
from .hyperparams import RMSpropHyperparams

_WIRE = {torch.float32: "float32", torch.float64: "float64"}


class RawGrad(Protocol):
    """A gradient as it arrived: dtype name, shape, little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


@dataclass
class _Entry:
    """One tensor's settled call: what it was settled for, and the arguments."""

    tensors: tuple[Tensor, ...]
    ptrs: tuple[int, ...]
    dtype: str
    shape: tuple[int, ...]
    args: tuple[Any, ...]  # dtype code, param, square_avg, grad_avg, momentum_buffer, numel
    itemsize: int
    step: Any  # the float32 step counter's memory (ctypes.c_float over the tensor's)


def step(params: Mapping[str, Tensor], state: Mapping[str, ParamState],
         grads: Mapping[str, RawGrad], hp: RMSpropHyperparams,
         memo: dict[Any, Any]) -> dict[str, native.Totals] | None:
    """Every gradient's RMSprop update in place, as `core.step` with the exact kernel would
    make it; the kernel's sums by name. None: nothing changed, take the general path."""
    lib = native._lib
    if lib is None or not native.enabled or not grads:
        return None
    key = (hp.centered, hp.momentum > 0)
    work = []
    for name, g in grads.items():
        entry = memo.get((name, key))
        param = params.get(name)
        st = state.get(name)
        if param is None or st is None:
            return None
        if entry is None or not _still(entry, param, st, key):
            entry = _settle(param, st, key)
            if entry is None:
                return None
            memo[(name, key)] = entry
        if g.dtype != entry.dtype or tuple(g.shape) != entry.shape or g.data.readonly \
                or g.data.nbytes != entry.args[5] * entry.itemsize:
            return None
        address = ctypes.addressof(ctypes.c_char.from_buffer(g.data))
        if address % entry.itemsize:
            return None
        work.append((name, entry, address))
    flags = ((native._MAXIMIZE if hp.maximize else 0)
             | (native._WEIGHT_DECAY if hp.weight_decay != 0 else 0)
             | (native._CENTERED if hp.centered else 0)
             | (native._MOMENTUM if hp.momentum > 0 else 0))
    threads = torch.get_num_threads()
    out: dict[str, native.Totals] = {}
    for name, entry, address in work:
        code, p, sa, ga, buf, n = entry.args
        totals = native.Totals()
        rc = lib.optserve_rmsprop(code, p, address, sa, ga, buf, n, -hp.lr, hp.alpha,
                                  1 - hp.alpha, hp.eps, hp.weight_decay, hp.momentum, flags,
                                  threads, native._PER_THREAD, ctypes.byref(totals))
        if rc != 0:  # checked before any work: the same for every tensor of the step
            if out:
                raise RuntimeError(f"the native kernel refused {name!r} after taking "
                                   f"{sorted(out)} (code {rc})")
            return None
        # RMSprop's update does not read the step: counted as torch counts it (a float32
        # add of 1: x + 1 is exact in double, then rounded to float32 as torch rounds it),
        # written to the counter tensor's memory (a torch op costs 5-35 us here).
        entry.step.value += 1.0
        totals.filled = True
        out[name] = totals
    return out


def _still(entry: _Entry, param: Tensor, st: ParamState, key: tuple[bool, bool]) -> bool:
    """Whether the settled call still describes these tensors (same objects, same memory)."""
    now = _used(param, st, key)
    return (now is not None and len(now) == len(entry.tensors)
            and all(a is b for a, b in zip(now, entry.tensors, strict=True))
            and all(t.data_ptr() == ptr for t, ptr in zip(now, entry.ptrs, strict=True)))


def _used(param: Tensor, st: ParamState, key: tuple[bool, bool]) -> tuple[Tensor, ...] | None:
    """param, step, square_avg, then grad_avg and momentum_buffer when in use; None when
    any is missing (the general path creates state)."""
    centered, momentum = key
    if "step" not in st or "square_avg" not in st:
        return None
    out = [param, st["step"], st["square_avg"]]
    for wanted, name in ((centered, "grad_avg"), (momentum, "momentum_buffer")):
        if wanted:
            t = st.get(name)
            if t is None:
                return None
            out.append(t)
    return tuple(out)


def _settle(param: Tensor, st: ParamState, key: tuple[bool, bool]) -> _Entry | None:
    """The call for these tensors, where the native kernel certainly takes them (as
    `native._usable` decides for a gradient of the parameter's own dtype)."""
    used = _used(param, st, key)
    # The parameter stands in for its gradient: the gradient's own dtype and alignment are
    # checked on every step (`step`).
    if used is None or param.dtype not in _WIRE \
            or native._usable(param, param, *used[2:]) is None:
        return None
    step = used[1]
    if not isinstance(step, Tensor) or step.dim() != 0 or step.dtype != torch.float32 \
            or step.device.type != "cpu":
        return None
    size = param.element_size()
    centered, momentum = key
    sa = used[2].data_ptr()
    ga = used[3].data_ptr() if centered else None
    buf = used[-1].data_ptr() if momentum else None
    args = (native._DTYPES[param.dtype], param.data_ptr(), sa, ga, buf, param.numel())
    return _Entry(used, tuple(t.data_ptr() for t in used), _WIRE[param.dtype],
                  tuple(param.shape), args, size, ctypes.c_float.from_address(step.data_ptr()))
