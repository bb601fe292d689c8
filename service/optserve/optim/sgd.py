"""SGD, as ``torch.optim.SGD`` computes it (``_single_tensor_sgd`` on CPU).

The update rule, as torch's documentation writes it (lr γ, weight decay λ, momentum μ,
dampening τ)::

    for t = 1, 2, ...:
        g_t ← ∇θ f_t(θ_{t-1})                 (negated when maximize)
        if λ ≠ 0:  g_t ← g_t + λ θ_{t-1}
        if μ ≠ 0:
            if t > 1:  b_t ← μ b_{t-1} + (1 - τ) g_t
            else:      b_t ← g_t
            if nesterov:  g_t ← g_t + μ b_t
            else:         g_t ← b_t
        θ_t ← θ_{t-1} - γ g_t

SGD keeps state only with momentum: ``momentum_buffer`` (b) starts as a copy of the first
(decayed, sign-adjusted) gradient, as in torch, including when momentum is switched on later.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .base import Kernel, OptimizerDef, ParamState, flat, flat_grad, flat_ok, flat_opt
from .exact import blocks
from .hyperparams import SGDHyperparams


def init_state(param: Tensor, hp: SGDHyperparams) -> ParamState:
    """No state before the first step: torch creates the buffer from the first gradient."""
    return {}


def update(param: Tensor, grad: Tensor, st: ParamState, hp: SGDHyperparams) -> None:
    """One step in place; ``_single_tensor_sgd``'s ops (float hyperparams), block by block.

    A missing momentum buffer is created empty and filled block by block with what torch's
    ``torch.clone(grad).detach()`` holds (same values, laid out like the parameter).
    """
    buf: Tensor | None = None
    fresh = False
    if hp.momentum != 0:
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = torch.empty_like(param, memory_format=torch.preserve_format)
            st["momentum_buffer"] = buf
            fresh = True
    for p, g, b in blocks(param, grad, buf):
        _ops(p, g, b, fresh, hp)  # type: ignore[arg-type]


def _ops(param: Tensor, grad: Tensor, buf: Tensor | None, fresh: bool,
         hp: SGDHyperparams) -> None:
    """torch's loop body: same ops, same order, same Python scalars."""
    grad = grad if not hp.maximize else -grad

    if hp.weight_decay != 0:
        grad = grad.add(param, alpha=hp.weight_decay)

    if buf is not None:
        if fresh:
            buf.copy_(grad)
        else:
            buf.mul_(hp.momentum).add_(grad, alpha=1 - hp.dampening)

        grad = grad.add(buf, alpha=hp.momentum) if hp.nesterov else buf

    param.add_(grad, alpha=-hp.lr)


def foreach_update(params: list[Tensor], grads: list[Tensor], states: list[ParamState],
                   hp: SGDHyperparams) -> None:
    """torch's multi-tensor SGD over all tensors at once, as torch.optim on CUDA; buffers
    it creates are stored back into the state, as ``torch.optim.SGD.step`` does."""
    bufs: list[Tensor | None] = [st.get("momentum_buffer") for st in states]
    torch.optim.sgd.sgd(
        params, grads, bufs, foreach=True, weight_decay=hp.weight_decay,
        momentum=hp.momentum, lr=hp.lr, dampening=hp.dampening, nesterov=hp.nesterov,
        maximize=hp.maximize)
    if hp.momentum != 0:
        for st, buf in zip(states, bufs, strict=True):
            st["momentum_buffer"] = buf  # type: ignore[assignment]


def fused_flags(hp: SGDHyperparams) -> tuple[bool, ...]:
    """(momentum != 0, nesterov, maximize, weight_decay != 0)."""
    return (hp.momentum != 0, hp.nesterov, hp.maximize, hp.weight_decay != 0)


def fused_kernel(flags: tuple[bool, ...]) -> Kernel:
    """The update as one expression per output, for inductor to fuse into one pass."""
    use_momentum, nesterov, maximize, use_wd = flags

    def sgd_kernel(param: Tensor, grad: Tensor, buf: Tensor | None, neg_lr: Tensor,
                   wd: Tensor, momentum: Tensor, one_minus_dampening: Tensor) -> Tensor:
        g = -grad if maximize else grad
        if use_wd:
            g = g + wd * param
        if use_momentum:
            assert buf is not None
            b = buf * momentum + one_minus_dampening * g
            buf.copy_(b)
            g = g + momentum * b if nesterov else b
        upd = neg_lr * g
        param.copy_(param + upd)
        return (upd * upd).sum()  # the update's squared norm, in the same pass

    return sgd_kernel


@lru_cache(maxsize=512)
def _scalars(hp: SGDHyperparams, dtype: torch.dtype,
             device: torch.device) -> tuple[Tensor, ...]:
    """The kernel's scalar arguments, computed in Python double as torch does, then cast."""
    values = (-hp.lr, hp.weight_decay, hp.momentum, 1 - hp.dampening)
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)


def fused_update(kernel: Kernel, param: Tensor, grad: Tensor, st: ParamState,
                 hp: SGDHyperparams) -> Tensor | None:
    """Run the kernel; the first momentum step (buffer = gradient copy) stays plain."""
    buf = st.get("momentum_buffer") if hp.momentum != 0 else None
    if hp.momentum != 0 and buf is None:
        return None
    if not flat_ok(param, buf):
        return None
    return kernel(flat(param), flat_grad(grad), flat_opt(buf),
                  *_scalars(hp, param.dtype, param.device))


def effective_lr(hp: SGDHyperparams, st: ParamState) -> Tensor | None:
    """SGD has no per-element step size: None (the step size is ``lr`` everywhere)."""
    return None


SGD = OptimizerDef(
    name="sgd",
    hyperparams=SGDHyperparams,
    torch_class=torch.optim.SGD,
    state_keys=("momentum_buffer",),
    init_state=init_state,
    update=update,
    foreach_update=foreach_update,
    fused_flags=fused_flags,
    fused_kernel=fused_kernel,
    fused_update=fused_update,
    effective_lr=effective_lr,
)
