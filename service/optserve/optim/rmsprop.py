"""RMSprop, as ``torch.optim.RMSprop`` computes it (``_single_tensor_rmsprop`` on CPU).

The update rule, as torch's documentation writes it (lr γ, alpha α, eps ε, weight decay λ,
momentum μ; v, b, g_ave start at 0)::

    for t = 1, 2, ...:
        g_t ← ∇θ f_t(θ_{t-1})                 (negated when maximize)
        if λ ≠ 0:     g_t ← g_t + λ θ_{t-1}
        v_t ← α v_{t-1} + (1 - α) g_t²
        ṽ_t ← v_t
        if centered:  g_ave_t ← α g_ave_{t-1} + (1 - α) g_t
                      ṽ_t ← ṽ_t - g_ave_t²
        if μ > 0:     b_t ← μ b_{t-1} + g_t / (√ṽ_t + ε)
                      θ_t ← θ_{t-1} - γ b_t
        else:         θ_t ← θ_{t-1} - γ g_t / (√ṽ_t + ε)

State names: ``square_avg`` (v), ``grad_avg`` (g_ave), ``momentum_buffer`` (b), ``step``.
The exact update repeats torch's ops one for one (same ops, same order, same Python
scalars), block by block on CPU, which is what makes it bitwise equal. Torch's CPU default
is that single-tensor path: ``foreach=None`` resolves to False because CPU is not a
foreach device; on CUDA it is the multi-tensor path, which ``foreach_update`` calls.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from . import native
from .base import Kernel, OptimizerDef, ParamState, flat, flat_grad, flat_ok, flat_opt, new_step
from .exact import blocks, scratch
from .hyperparams import RMSpropHyperparams


def init_state(param: Tensor, hp: RMSpropHyperparams) -> ParamState:
    """Torch's state for a parameter's first gradient (same keys, same insertion order)."""
    st: ParamState = {
        "step": new_step(),
        "square_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
    }
    if hp.momentum > 0:
        st["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if hp.centered:
        st["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return st


def _complete(param: Tensor, st: ParamState, hp: RMSpropHyperparams) -> None:
    """Create missing entries; momentum or centering switched on later start from zeros."""
    if not st:
        st.update(init_state(param, hp))
        return
    if "step" not in st:
        st["step"] = new_step()
    for key, wanted in (("square_avg", True), ("momentum_buffer", hp.momentum > 0),
                        ("grad_avg", hp.centered)):
        if wanted and key not in st:
            st[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def update(param: Tensor, grad: Tensor, st: ParamState, hp: RMSpropHyperparams) -> None:
    """One step in place: ``_single_tensor_rmsprop``'s ops in one native pass once that is
    built (see ``native``), else block by block (see ``exact``); the same bits either way."""
    _complete(param, st, hp)
    st["step"] += 1
    ga = st["grad_avg"] if hp.centered else None
    buf = st["momentum_buffer"] if hp.momentum > 0 else None
    if native.rmsprop(param, grad, st["square_avg"], ga, buf, hp.lr, hp.alpha, hp.eps,
                      hp.weight_decay, hp.momentum, hp.maximize):
        return
    tmp = scratch(param)
    for p, g, sa, gav, b in blocks(param, grad, st["square_avg"], ga, buf):
        out = None if tmp is None else tmp[:p.numel()]  # type: ignore[union-attr]
        _ops(p, g, sa, gav, b, hp, out)  # type: ignore[arg-type]


def _ops(param: Tensor, grad: Tensor, square_avg: Tensor, grad_avg: Tensor | None,
         buf: Tensor | None, hp: RMSpropHyperparams, out: Tensor | None) -> None:
    """torch's loop body after ``step += 1``: same ops, same order, same Python scalars
    (``avg`` goes to ``out`` when given: the same kernel, minus an allocation)."""
    lr, alpha, eps = hp.lr, hp.alpha, hp.eps
    grad = grad if not hp.maximize else -grad

    if hp.weight_decay != 0:
        grad = grad.add(param, alpha=hp.weight_decay)

    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)

    if grad_avg is not None:
        grad_avg.lerp_(grad, 1 - alpha)
        avg = torch.addcmul(square_avg, grad_avg, grad_avg, value=-1, out=out).sqrt_()
    else:
        avg = torch.sqrt(square_avg, out=out)
    avg = avg.add_(eps)

    if buf is not None:
        buf.mul_(hp.momentum).addcdiv_(grad, avg)
        param.add_(buf, alpha=-lr)
    else:
        param.addcdiv_(grad, avg, value=-lr)


def foreach_update(params: list[Tensor], grads: list[Tensor], states: list[ParamState],
                   hp: RMSpropHyperparams) -> None:
    """torch's multi-tensor RMSprop over all tensors at once, as torch.optim on CUDA."""
    for param, st in zip(params, states, strict=True):
        _complete(param, st, hp)
    torch.optim.rmsprop.rmsprop(
        params, grads, [st["square_avg"] for st in states],
        [st["grad_avg"] for st in states] if hp.centered else [],
        [st["momentum_buffer"] for st in states] if hp.momentum > 0 else [],
        [st["step"] for st in states], foreach=True, maximize=hp.maximize,
        has_complex=any(torch.is_complex(p) for p in params), lr=hp.lr, alpha=hp.alpha,
        eps=hp.eps, weight_decay=hp.weight_decay, momentum=hp.momentum, centered=hp.centered)


def fused_flags(hp: RMSpropHyperparams) -> tuple[bool, ...]:
    """(centered, momentum > 0, maximize, weight_decay != 0)."""
    return (hp.centered, hp.momentum > 0, hp.maximize, hp.weight_decay != 0)


def fused_kernel(flags: tuple[bool, ...]) -> Kernel:
    """The update as one expression per output, for inductor to fuse into one pass."""
    centered, use_momentum, maximize, use_wd = flags

    def rmsprop_kernel(param: Tensor, grad: Tensor, square_avg: Tensor,
                       grad_avg: Tensor | None, buf: Tensor | None, neg_lr: Tensor,
                       alpha: Tensor, one_minus_alpha: Tensor, eps: Tensor, wd: Tensor,
                       momentum: Tensor) -> Tensor:
        g = -grad if maximize else grad
        if use_wd:
            g = g + wd * param
        sa = square_avg * alpha + one_minus_alpha * g * g
        square_avg.copy_(sa)
        if centered:
            assert grad_avg is not None
            ga = torch.lerp(grad_avg, g, one_minus_alpha)
            grad_avg.copy_(ga)
            avg = (sa - ga * ga).sqrt() + eps
        else:
            avg = sa.sqrt() + eps
        if use_momentum:
            assert buf is not None
            b = buf * momentum + g / avg
            buf.copy_(b)
            upd = neg_lr * b
        else:
            upd = neg_lr * (g / avg)
        param.copy_(param + upd)
        return (upd * upd).sum()  # the update's squared norm, in the same pass

    return rmsprop_kernel


@lru_cache(maxsize=512)
def _scalars(hp: RMSpropHyperparams, dtype: torch.dtype,
             device: torch.device) -> tuple[Tensor, ...]:
    """The kernel's scalar arguments, computed in Python double as torch does, then cast."""
    values = (-hp.lr, hp.alpha, 1 - hp.alpha, hp.eps, hp.weight_decay, hp.momentum)
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)


def fused_update(kernel: Kernel, param: Tensor, grad: Tensor, st: ParamState,
                 hp: RMSpropHyperparams) -> Tensor | None:
    """Count the step and run the compiled kernel on 1-D views of everything."""
    _complete(param, st, hp)
    square_avg = st["square_avg"]
    grad_avg = st["grad_avg"] if hp.centered else None
    buf = st["momentum_buffer"] if hp.momentum > 0 else None
    if not flat_ok(param, square_avg, grad_avg, buf):
        return None
    sq = kernel(flat(param), flat_grad(grad), flat(square_avg), flat_opt(grad_avg),
                flat_opt(buf), *_scalars(hp, param.dtype, param.device))
    st["step"] += 1  # after the kernel: a kernel that raises leaves the count alone
    return sq


def effective_lr(hp: RMSpropHyperparams, st: ParamState) -> Tensor | None:
    """lr / (sqrt(v) + eps), v = square_avg (centered: minus grad_avg squared), as torch's docs."""
    square_avg = st.get("square_avg")
    if square_avg is None:
        return None
    grad_avg = st.get("grad_avg")
    if hp.centered and grad_avg is not None:
        v = square_avg.addcmul(grad_avg, grad_avg, value=-1)
    else:
        v = square_avg
    return hp.lr / v.sqrt().add_(hp.eps)


RMSPROP = OptimizerDef(
    name="rmsprop",
    hyperparams=RMSpropHyperparams,
    torch_class=torch.optim.RMSprop,
    state_keys=("step", "square_avg", "momentum_buffer", "grad_avg"),
    init_state=init_state,
    update=update,
    foreach_update=foreach_update,
    fused_flags=fused_flags,
    fused_kernel=fused_kernel,
    fused_update=fused_update,
    effective_lr=effective_lr,
)
