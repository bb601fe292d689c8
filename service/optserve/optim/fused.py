"""The compiled kernel (opt-in): each optimizer's update compiled by ``torch.compile``.

Not bitwise equal to torch: inductor computes ``sqrt`` with IEEE rounding where ATen's CPU
kernel (MKL VML) is off by an ulp for ~15% of float32 inputs, and it contracts and reorders
the arithmetic of a whole update into one expression. The README's Exactness section gives
the measured error against torch per optimizer and option row. The default is the exact
path (:mod:`optserve.optim.exact`).

Why have it: one pass over memory per tensor, ~the fastest a step can be on a CPU.

How it stays cheap:

- One compiled function per (optimizer, structural flags, dtype, device). Each gets its own
  code object, so dynamo's per-code recompile limit is never shared between them.
- Tensors are passed as 1-D aliases with ``dynamic=True``: one graph serves every size.
  Small tensors (see ``FUSED_MIN_NUMEL``) and non-contiguous ones take the exact path.
- lr, alpha, eps, ... are 0-dim tensors, so a new learning rate each step (schedulers) reuses
  the compiled code. The step counter is incremented eagerly, after the kernel ran.
- The first use of a key compiles on dummy data under a lock; :func:`warmup` does this ahead
  of time. A failed compile logs once and leaves that key on the exact path.

Which path runs is the caller's choice (``step(..., kernel="compiled")``; the service's
``OPTSERVE_KERNEL``); nothing here reads the environment.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .base import Kernel, OptimizerDef, ParamState

log = logging.getLogger(__name__)

FUSED_MIN_NUMEL = 65536
"""Smaller tensors take the exact path even under ``kernel="compiled"``: below ~1e5
elements a compiled call's fixed cost (dynamo guards, ~40 us on CPU) outweighs the memory
passes it saves. Must stay >= 2, as dynamo specialises sizes 0 and 1."""

_WARMUP_NUMEL = 1 << 16
"""Warm-up tensor size. Inductor decides from this size hint whether the kernel's loop runs
on all threads (OpenMP); a tiny hint gives a single-threaded kernel."""

_KernelKey = tuple[str, tuple[bool, ...], torch.dtype, str, int | None]
_KERNELS: dict[_KernelKey, Kernel | None] = {}
_LOCK = threading.Lock()

calls = 0
"""Tensor updates run by a compiled kernel in this process (a diagnostic for tests)."""


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


_UNAVAILABLE: dict[str, str] = {}
"""device type -> why compiling does not work there (found by :func:`probe`)."""


def probe(device: torch.device | str = "cpu") -> str | None:
    """Compile one small kernel, to learn at start-up (in the background) rather than on a
    user's first step whether ``torch.compile`` works here (a missing C++ compiler takes
    seconds to fail). Returns why not, or None; once it failed, steps go exact at once."""
    from .core import get_optimizer

    opt = get_optimizer("rmsprop")
    hp = opt.hyperparams()
    dev = torch.device(device)
    try:
        with _LOCK:  # dynamo is not thread-safe: two compiles at once left its process-wide
            _build(opt, hp, _key(opt, hp, torch.float32, dev))  # "compiling" flag set
    except Exception as exc:  # any failure of the compiler stack: the exact path serves
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        _UNAVAILABLE[dev.type] = reason
        log.error("OPTSERVE_KERNEL=compiled, but torch.compile does not work on %s here (%s); "
                  "every step takes the exact path", dev.type, reason)
        return reason
    log.info("OPTSERVE_KERNEL=compiled: torch.compile works on %s", dev.type)
    return None


def get_kernel(opt: OptimizerDef, hp: Any, dtype: torch.dtype,
               device: torch.device) -> Kernel | None:
    """The compiled kernel for these hyperparameters' flags, or None (exact path)."""
    key = _key(opt, hp, dtype, device)
    if key in _KERNELS:
        return _KERNELS[key]
    if device.type in _UNAVAILABLE:
        return None
    with _LOCK:
        if key in _KERNELS:
            return _KERNELS[key]
        kernel: Kernel | None
        try:
            kernel = _build(opt, hp, key)
        except Exception as exc:
            log.warning("torch.compile unavailable for %s %s %s, using the exact path: %s",
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
    """Compiled kernels for every (dtype, device) these params need, resolved up front (so
    compiling happens before any tensor has changed)."""
    out: dict[tuple[torch.dtype, torch.device], Kernel] = {}
    for param in params:
        where = (param.dtype, param.device)
        if where not in out and eligible(param):
            kernel = get_kernel(opt, hp, param.dtype, param.device)
            if kernel is not None:
                out[where] = kernel
    return out


def run(opt: OptimizerDef, kernel: Kernel, param: Tensor, grad: Tensor, st: ParamState,
        hp: Any) -> Tensor | None:
    """One tensor's compiled update; None (nothing changed) where it must run exact."""
    global calls
    sq = opt.fused_update(kernel, param, grad, st, hp)
    if sq is not None:
        calls += 1
    return sq


def reset() -> None:
    """Forget compiled kernels and probe results (tests)."""
    _UNAVAILABLE.clear()
    with _LOCK:
        _KERNELS.clear()
