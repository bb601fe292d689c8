"""The fused path: each optimizer's per-tensor update compiled by ``torch.compile`` (inductor).

Why: torch's CPU RMSprop runs five separate elementwise ops per tensor (and allocates a
temporary), i.e. about a dozen passes over memory; the compiled kernel reads param, grad and
state once and writes param and state once.

How it stays cheap and correct:

- One compiled function per (optimizer, structural flags, dtype, device). Each gets its own
  code object, so dynamo's per-code recompile limit is never shared between them.
- Tensors are passed as 1-D aliases with ``dynamic=True``: one graph serves every size.
  Small tensors (see ``FUSED_MIN_NUMEL``) and non-contiguous ones take the plain path.
- lr, alpha, eps, ... are 0-dim tensors, so a new learning rate each step (schedulers) reuses
  the compiled code. The step counter is incremented eagerly, after the kernel ran.
- The first use of a key compiles on dummy data under a lock; :func:`warmup` does this ahead
  of time. A failed compile logs once and leaves that key on the plain path.

``OPTSERVE_FUSED``: ``off`` never compiles, ``auto`` (default) compiles and falls back on
failure, ``on`` compiles and raises on failure.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from .base import Kernel, OptimizerDef, ParamState

log = logging.getLogger(__name__)

FusedMode = Literal["auto", "on", "off"]

FUSED_MIN_NUMEL = max(2, int(os.environ.get("OPTSERVE_FUSED_MIN_NUMEL", "65536")))
"""Smaller tensors take the plain path: below ~1e5 elements a compiled call's fixed cost
(dynamo guards, ~40 us on CPU) outweighs the memory passes it saves. Must stay >= 2, as
dynamo specialises sizes 0 and 1. Override with ``OPTSERVE_FUSED_MIN_NUMEL``."""

_WARMUP_NUMEL = 1 << 16
"""Warm-up tensor size. Inductor decides from this size hint whether the kernel's loop runs
on all threads (OpenMP); a tiny hint gives a single-threaded kernel."""

_KernelKey = tuple[str, tuple[bool, ...], torch.dtype, str, int | None]
_KERNELS: dict[_KernelKey, Kernel | None] = {}
_LOCK = threading.Lock()


_MODE_OVERRIDE: FusedMode | None = None


def set_fused_mode(mode: FusedMode | None) -> None:
    """Set the mode from the service's settings; None goes back to ``OPTSERVE_FUSED``."""
    global _MODE_OVERRIDE
    if mode not in (None, "auto", "on", "off"):
        raise ValueError(f"fused mode must be auto, on or off, not {mode!r}")
    _MODE_OVERRIDE = mode


def fused_mode() -> FusedMode:
    """The mode: :func:`set_fused_mode`'s, else ``OPTSERVE_FUSED`` (read per call)."""
    if _MODE_OVERRIDE is not None:
        return _MODE_OVERRIDE
    raw = os.environ.get("OPTSERVE_FUSED", "auto").strip().lower()
    if raw in ("off", "0", "false", "no"):
        return "off"
    if raw in ("on", "1", "true", "yes"):
        return "on"
    return "auto"


def _unique(fn: Callable[..., None], tag: str) -> Callable[..., None]:
    """A copy of ``fn`` with its own code object: dynamo keeps caches per code object."""
    name = f"{fn.__name__}_{tag}"
    names = {"co_name": name}
    if hasattr(fn.__code__, "co_qualname"):  # Python >= 3.11
        names["co_qualname"] = name
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _key(opt: OptimizerDef, hp: Any, dtype: torch.dtype, device: torch.device) -> _KernelKey:
    return (opt.name, opt.fused_flags(hp), dtype, device.type, device.index)


def _build(opt: OptimizerDef, hp: Any, key: _KernelKey) -> Kernel:
    """Compile the kernel for ``key`` and run it once on dummy data, so compiling is done."""
    flags, dtype, device = key[1], key[2], torch.device(key[3], key[4])
    tag = "_".join([*(str(int(f)) for f in flags), str(dtype).removeprefix("torch."),
                    device.type])
    kernel = torch.compile(_unique(opt.fused_kernel(flags), tag), dynamic=True,
                           fullgraph=True)
    param = torch.linspace(-1.0, 1.0, _WARMUP_NUMEL, dtype=dtype, device=device)
    grad = torch.linspace(0.5, -0.5, _WARMUP_NUMEL, dtype=dtype, device=device)
    st: ParamState = {}
    with torch.no_grad():
        opt.update(param, grad, st, hp)  # state as after a first step (SGD's buffer)
        if opt.fused_update(kernel, param, grad, st, hp) is None:
            raise RuntimeError(f"{opt.name}: fused update refused its warm-up tensors")
    return kernel


def _cached(key: _KernelKey, mode: FusedMode) -> Kernel | None:
    """A known kernel; under ``on``, a compile that failed before (in ``auto``) raises."""
    kernel = _KERNELS[key]
    if kernel is None and mode == "on":
        raise RuntimeError(f"torch.compile failed earlier for {key}; OPTSERVE_FUSED=on")
    return kernel


def get_kernel(opt: OptimizerDef, hp: Any, dtype: torch.dtype,
               device: torch.device) -> Kernel | None:
    """The compiled kernel for these hyperparameters' flags, or None (plain path)."""
    mode = fused_mode()
    if mode == "off":
        return None
    key = _key(opt, hp, dtype, device)
    if key in _KERNELS:
        return _cached(key, mode)
    with _LOCK:
        if key in _KERNELS:
            return _cached(key, mode)
        kernel: Kernel | None
        try:
            kernel = _build(opt, hp, key)
        except Exception as exc:
            if mode == "on":
                raise
            log.warning("torch.compile unavailable for %s %s %s, using plain ops: %s",
                        opt.name, dtype, device, exc)
            kernel = None
        _KERNELS[key] = kernel
        return kernel


def warmup(opt: OptimizerDef, hp: Any, dtype: torch.dtype = torch.float32,
           device: torch.device | str = "cpu") -> bool:
    """Compile ahead of the hot path; True when steps with ``hp`` will run fused."""
    return get_kernel(opt, hp, dtype, torch.device(device)) is not None


def eligible(param: Tensor) -> bool:
    """Whether this parameter is worth (and able to) run fused at all."""
    return param.numel() >= FUSED_MIN_NUMEL and param.dtype in (torch.float32, torch.float64)


def kernels_for(opt: OptimizerDef, hp: Any, params: Iterable[Tensor]
                ) -> dict[tuple[torch.dtype, torch.device], Kernel]:
    """Compiled kernels for every (dtype, device) these params need, resolved up front so a
    compile failure under ``OPTSERVE_FUSED=on`` raises before any tensor has changed."""
    out: dict[tuple[torch.dtype, torch.device], Kernel] = {}
    for param in params:
        where = (param.dtype, param.device)
        if where not in out and eligible(param):
            kernel = get_kernel(opt, hp, param.dtype, param.device)
            if kernel is not None:
                out[where] = kernel
    return out


def reset() -> None:
    """Forget compiled kernels (tests; after changing ``OPTSERVE_FUSED``)."""
    with _LOCK:
        _KERNELS.clear()
