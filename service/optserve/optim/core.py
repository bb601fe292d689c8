"""The batch API over named tensors: registry, ``step``, finiteness, effective learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from . import fused as _fused
from . import native as _native
from .adagrad import ADAGRAD
from .base import OptimizerDef, ParamState
from .rmsprop import RMSPROP
from .sgd import SGD

OPTIMIZERS: dict[str, OptimizerDef] = {o.name: o for o in (RMSPROP, ADAGRAD, SGD)}
"""Every optimizer by its wire name."""

GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Gradient dtypes accepted and cast to the parameter's dtype."""


class UnknownOptimizerError(ValueError, KeyError):
    """An optimizer name we do not have; both a ValueError and a KeyError for callers."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_optimizer(name: str) -> OptimizerDef:
    """The optimizer called ``name`` (case-insensitive); the error lists the allowed names."""
    try:
        return OPTIMIZERS[name.lower()]
    except (KeyError, AttributeError):
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}"
        ) from None


def _prepare(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None]
             ) -> list[tuple[str, Tensor, Tensor]]:
    """Check every gradient before anything changes, and cast it to its parameter's dtype."""
    unknown = [n for n in grads if n not in params]
    if unknown:
        raise ValueError(f"gradients for unknown parameters: {sorted(unknown)}")
    work: list[tuple[str, Tensor, Tensor]] = []
    for name, param in params.items():
        grad = grads.get(name)
        if grad is None:
            continue
        if not param.is_floating_point():
            raise ValueError(f"parameter {name!r} has dtype {param.dtype}, not floating point")
        if grad.dtype not in GRAD_DTYPES:
            raise ValueError(f"gradient {name!r} has dtype {grad.dtype}; allowed: "
                             f"{', '.join(str(d).removeprefix('torch.') for d in GRAD_DTYPES)}")
        if grad.shape != param.shape:
            raise ValueError(f"gradient {name!r} has shape {tuple(grad.shape)}, "
                             f"parameter has {tuple(param.shape)}")
        if grad.is_sparse:
            raise ValueError(f"gradient {name!r} is sparse; only dense gradients are supported")
        work.append((name, param, grad.to(device=param.device, dtype=param.dtype)))
    return work


KERNELS = ("exact", "compiled")
"""``exact``: torch's own ops, bitwise equal to ``torch.optim`` (default). ``compiled``: the
``torch.compile``d one-pass update, faster and close but not bitwise (see ``fused``)."""

KernelName = Literal["exact", "compiled"]


def step(opt: OptimizerDef, params: dict[str, Tensor], grads: Mapping[str, Tensor | None],
         state: dict[str, ParamState], hp: Any, *, kernel: KernelName = "exact",
         track_update: bool = False, fused: bool | None = None,
         totals: dict[str, _native.Totals] | None = None) -> dict[str, float]:
    """One optimizer step, in place, like ``torch.optim.<X>.step()`` with these gradients.

    A missing or None gradient leaves its parameter and state alone (no step counted);
    state is created on a parameter's first gradient. Gradients are validated before
    anything changes.

    ``kernel="exact"`` (default) is bitwise equal to what ``torch.optim`` runs by default on
    the parameter's device: on CPU torch's single-tensor ops, in one native pass per tensor
    once that is built (RMSprop, AdaGrad; see ``optserve.optim.native``) or applied block by
    block (see ``optserve.optim.exact``); elsewhere (CUDA) torch's own multi-tensor
    (foreach) function over all of the step's tensors on that device. ``kernel="compiled"``
    runs the compiled one-pass update on float32/float64 tensors of ``FUSED_MIN_NUMEL``
    elements or more (see ``optserve.optim.fused``). ``fused`` is the old spelling: True
    means compiled.

    With ``track_update``, returns each stepped parameter's squared update norm
    ``||new - old||^2`` (the stats' "last update norm"): from the compiled kernel's own pass,
    or on the exact path from a copy of the old values (an extra pass, hence opt-in). It
    may be inf when a float32 sum overflowed: callers check the tensors themselves then.
    Where the native kernel updates a tensor it sums these itself, in double, in the same
    pass; with ``totals`` given, its full sums for those tensors (gradient, update and
    accumulator; see ``native.Totals``) are put there by name.
    """
    if fused is not None:
        kernel = "compiled" if fused else "exact"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if not isinstance(hp, opt.hyperparams):
        raise TypeError(f"{opt.name} needs {opt.hyperparams.__name__}, got {type(hp).__name__}")
    work = _prepare(params, grads)
    compiled = (_fused.kernels_for(opt, hp, (p for _, p, _ in work))
                if kernel == "compiled" else {})
    update_sq: dict[str, float] = {}
    device_work: list[tuple[str, Tensor, Tensor]] = []
    with torch.no_grad():
        for name, param, grad in work:
            st = state.setdefault(name, {})
            sq = None
            fn = compiled.get((param.dtype, param.device)) if compiled else None
            if fn is not None and _fused.eligible(param):
                sq = _fused.run(opt, fn, param, grad, st, hp)
            if sq is not None:
                if track_update:
                    update_sq[name] = float(sq)
                continue
            if param.device.type != "cpu":
                device_work.append((name, param, grad))
                continue
            if track_update:
                with _native.collect(param, grad, st) as sums:
                    before = None if sums is not None else param.clone()
                    opt.update(param, grad, st, hp)
                if sums is not None and sums.filled:
                    update_sq[name] = sums.update_sq
                    if totals is not None:
                        totals[name] = sums
                elif before is not None:
                    update_sq[name] = _sq_norm(param, before)
                else:  # the kernel declined after all: unknown, callers check the tensors
                    update_sq[name] = math.inf
                continue
            opt.update(param, grad, st, hp)
        if device_work:
            olds = [p.clone() for _, p, _ in device_work] if track_update else None
            opt.foreach_update([p for _, p, _ in device_work], [g for _, _, g in device_work],
                               [state[n] for n, _, _ in device_work], hp)
            if olds is not None:
                for (name, param, _), before in zip(device_work, olds, strict=True):
                    update_sq[name] = _sq_norm(param, before)
        for name, _, _ in work:
            if not state[name]:  # SGD without momentum keeps no state, as torch
                del state[name]
    return update_sq


def _sq_norm(new: Tensor, before: Tensor) -> float:
    """||new - before||^2, written into `before` (a copy taken for this and dropped after):
    no new allocation and two ops. A float64 difference of the whole tensor cost 34 ms at
    1e7 elements, twice the update; blocks from Python were fast alone but waited on the GIL
    at every block while the event loop was busy (up to 200 ms). Sums in the tensor's dtype;
    one that overflows again in float64."""
    diff = torch.sub(new, before, out=before)
    sq = float(torch.linalg.vector_norm(diff)) ** 2
    if not math.isfinite(sq):
        sq = float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    return sq


def finite(t: Tensor) -> bool:
    """Whether `t` holds no NaN or +-inf. A finite sum proves it (NaN and inf propagate
    through a sum) at a third of `isfinite().all()`'s cost; a non-finite sum may only be an
    overflow of finite values, so then the exact check decides."""
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return True
    return math.isfinite(abs(t.sum().item())) or bool(torch.isfinite(t).all())


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether no tensor holds NaN or +-inf (the engine refuses steps that fail this)."""
    return all(finite(t) for t in tensors)


def effective_lr(opt: OptimizerDef, hp: Any, param_state: ParamState) -> Tensor | None:
    """The per-element step size from a parameter's state (stats endpoint), or None.

    RMSprop: lr / (sqrt(v) + eps), v = square_avg (centered: square_avg - grad_avg**2).
    Adagrad: clr / (sqrt(sum) + eps), clr = lr / (1 + (step - 1) * lr_decay). SGD: None.
    """
    with torch.no_grad():
        return opt.effective_lr(hp, param_state)
