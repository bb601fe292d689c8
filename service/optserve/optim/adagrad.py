"""Adagrad, as ``torch.optim.Adagrad`` computes it (``_single_tensor_adagrad`` on CPU).

The update rule, as torch's documentation writes it (lr γ, weight decay λ, initial
accumulator value τ, lr decay η, eps ε)::

    state_sum_0 ← τ
    for t = 1, 2, ...:
        g_t ← ∇θ f_t(θ_{t-1})                 (negated when maximize)
        γ̃ ← γ / (1 + (t - 1) η)
        if λ ≠ 0:  g_t ← g_t + λ θ_{t-1}
        state_sum_t ← state_sum_{t-1} + g_t²
        θ_t ← θ_{t-1} - γ̃ g_t / (√state_sum_t + ε)

State names: ``sum`` (state_sum), ``step``. γ̃ is computed in Python double from the
float32 step count, as torch does. Torch creates Adagrad's state for every parameter in
``__init__`` (step 0, ``sum`` filled with τ); we create it on the first gradient instead,
which computes the same thing, and the torch state_dict conversion fills in the rest.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from . import native
from .base import Kernel, OptimizerDef, ParamState, flat, flat_grad, flat_ok, new_step
from .exact import blocks
from .hyperparams import AdagradHyperparams


def init_state(param: Tensor, hp: AdagradHyperparams) -> ParamState:
    """Torch's eager initial state: step 0 and ``sum`` = initial_accumulator_value."""
    return {
        "step": new_step(),
        "sum": torch.full_like(param, hp.initial_accumulator_value,
                               memory_format=torch.preserve_format),
    }


def _complete(param: Tensor, st: ParamState, hp: AdagradHyperparams) -> None:
    """Create missing entries (a fresh parameter, or state imported without them)."""
    if "step" not in st:
        st["step"] = new_step()
    if "sum" not in st:
        st["sum"] = torch.full_like(param, hp.initial_accumulator_value,
                                    memory_format=torch.preserve_format)


def _clr(hp: AdagradHyperparams, step: float) -> float:
    """The decayed learning rate, in Python double as torch computes it."""
    return hp.lr / (1 + (step - 1) * hp.lr_decay)


def update(param: Tensor, grad: Tensor, st: ParamState, hp: AdagradHyperparams) -> None:
    """One step in place: ``_single_tensor_adagrad``'s ops (dense) in one native pass once
    that is built (see ``native``), else block by block; the same bits either way."""
    _complete(param, st, hp)
    step_t = st["step"]
    step_t += 1
    step = step_t.item()
    clr = _clr(hp, step)
    if native.adagrad(param, grad, st["sum"], clr, hp.eps, hp.weight_decay, hp.maximize):
        return
    for p, g, s in blocks(param, grad, st["sum"]):
        _ops(p, g, s, clr, hp)  # type: ignore[arg-type]


def _ops(param: Tensor, grad: Tensor, state_sum: Tensor, clr: float,
         hp: AdagradHyperparams) -> None:
    """torch's loop body after the step count and ``clr``: same ops, order and scalars."""
    grad = grad if not hp.maximize else -grad

    if hp.weight_decay != 0:
        grad = grad.add(param, alpha=hp.weight_decay)

    state_sum.addcmul_(grad, grad, value=1)
    std = state_sum.sqrt().add_(hp.eps)
    param.addcdiv_(grad, std, value=-clr)


def foreach_update(params: list[Tensor], grads: list[Tensor], states: list[ParamState],
                   hp: AdagradHyperparams) -> None:
    """torch's multi-tensor Adagrad over all tensors at once, as torch.optim on CUDA."""
    for param, st in zip(params, states, strict=True):
        _complete(param, st, hp)
    torch.optim.adagrad.adagrad(
        params, grads, [st["sum"] for st in states], [st["step"] for st in states],
        foreach=True, has_complex=any(torch.is_complex(p) for p in params), lr=hp.lr,
        weight_decay=hp.weight_decay, lr_decay=hp.lr_decay, eps=hp.eps, maximize=hp.maximize)


def fused_flags(hp: AdagradHyperparams) -> tuple[bool, ...]:
    """(maximize, weight_decay != 0); lr_decay lives in the per-step ``neg_clr`` scalar."""
    return (hp.maximize, hp.weight_decay != 0)


def fused_kernel(flags: tuple[bool, ...]) -> Kernel:
    """The update as one expression per output, for inductor to fuse into one pass."""
    maximize, use_wd = flags

    def adagrad_kernel(param: Tensor, grad: Tensor, state_sum: Tensor, neg_clr: Tensor,
                       eps: Tensor, wd: Tensor) -> Tensor:
        g = -grad if maximize else grad
        if use_wd:
            g = g + wd * param
        s = state_sum + g * g
        state_sum.copy_(s)
        std = s.sqrt() + eps
        upd = neg_clr * (g / std)
        param.copy_(param + upd)
        return (upd * upd).sum()  # the update's squared norm, in the same pass

    return adagrad_kernel


@lru_cache(maxsize=512)
def _scalars(hp: AdagradHyperparams, dtype: torch.dtype,
             device: torch.device) -> tuple[Tensor, ...]:
    """The kernel's constant scalar arguments (eps, weight_decay)."""
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in (hp.eps, hp.weight_decay))


def fused_update(kernel: Kernel, param: Tensor, grad: Tensor, st: ParamState,
                 hp: AdagradHyperparams) -> Tensor | None:
    """Count the step, compute the decayed lr in Python as torch does, run the kernel."""
    _complete(param, st, hp)
    state_sum = st["sum"]
    if not flat_ok(param, state_sum):
        return None
    step_t = st["step"]
    # The count torch would have after its ``step_t += 1``, in float32 arithmetic as there.
    step = (step_t + 1).item()
    neg_clr = torch.tensor(-_clr(hp, step), dtype=param.dtype, device=param.device)
    sq = kernel(flat(param), flat_grad(grad), flat(state_sum), neg_clr,
                *_scalars(hp, param.dtype, param.device))
    step_t += 1  # after the kernel: a kernel that raises leaves the count alone
    return sq


def effective_lr(hp: AdagradHyperparams, st: ParamState) -> Tensor | None:
    """clr / (sqrt(sum) + eps), clr at the last step taken (lr before the first)."""
    state_sum = st.get("sum")
    if state_sum is None:
        return None
    step = float(st["step"].item()) if "step" in st else 0.0
    return _clr(hp, max(step, 1.0)) / state_sum.sqrt().add_(hp.eps)


ADAGRAD = OptimizerDef(
    name="adagrad",
    hyperparams=AdagradHyperparams,
    torch_class=torch.optim.Adagrad,
    state_keys=("step", "sum"),
    init_state=init_state,
    update=update,
    foreach_update=foreach_update,
    fused_flags=fused_flags,
    fused_kernel=fused_kernel,
    fused_update=fused_update,
    effective_lr=effective_lr,
    eager_state=True,
)
