"""The shape of one optimizer: plain functions over one tensor and its state dict (optax style).

Each optimizer module (``rmsprop``, ``adagrad``, ``sgd``) builds one :class:`OptimizerDef`.
Everything works per parameter tensor, so the batch functions in ``optserve.optim.core`` only
loop; a per-tensor loop is also exactly what ``torch.optim`` runs on CPU (the single-tensor
path), which is what makes the exact path bitwise equal to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .hyperparams import Hyperparams

ParamState = dict[str, Tensor]
"""One parameter's state, keyed by torch's state names (``step``, ``square_avg``, ...)."""

Kernel = Callable[..., Tensor]
"""A per-tensor update over flat (1-D) tensors and 0-dim scalar tensors, compiled or not."""


@dataclass(frozen=True)
class OptimizerDef:
    """One optimizer: its hyperparameter model and its per-tensor functions.

    - ``init_state(param, hp)``: the state torch would create for a fresh parameter.
    - ``update(param, grad, state, hp)``: one exact step in place, op for op as torch's
      single-tensor implementation (on CPU natively or block by block, see ``native``);
      creates missing state first.
    - ``foreach_update(params, grads, states, hp)``: one exact step for several tensors on a
      non-CPU device, through torch's own multi-tensor (foreach) function, as
      ``torch.optim`` defaults to there.
    - ``fused_flags(hp)``: the structural switches a compiled kernel is specialised on.
    - ``fused_kernel(flags)``: the per-tensor update written for ``torch.compile``.
    - ``fused_update(kernel, param, grad, state, hp)``: runs ``kernel`` for one tensor; returns
      None, before changing anything, where the exact path must do this step instead.
    - ``effective_lr(hp, state)``: the per-element step size, or None where there is none.
    """

    name: str
    hyperparams: type[Hyperparams]
    torch_class: type[torch.optim.Optimizer]
    state_keys: tuple[str, ...]
    init_state: Callable[[Tensor, Any], ParamState]
    update: Callable[[Tensor, Tensor, ParamState, Any], None]
    foreach_update: Callable[[list[Tensor], list[Tensor], list[ParamState], Any], None]
    fused_flags: Callable[[Any], tuple[bool, ...]]
    fused_kernel: Callable[[tuple[bool, ...]], Kernel]
    fused_update: Callable[[Kernel, Tensor, Tensor, ParamState, Any], Tensor | None]
    effective_lr: Callable[[Any, ParamState], Tensor | None]
    eager_state: bool = False
    """True where torch creates every parameter's state in ``__init__`` (Adagrad)."""


def new_step() -> Tensor:
    """A fresh step counter: 0-dim float32 on CPU, as torch makes it (non-capturable)."""
    return torch.zeros((), dtype=torch.float32)


def flat_ok(param: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the state tensors can be viewed 1-D alongside ``param`` (compiled path)."""
    if not param.is_contiguous():
        return False
    for t in tensors:
        if t is None:
            continue
        if (t.shape != param.shape or t.dtype != param.dtype or t.device != param.device
                or not t.is_contiguous()):
            return False
    return True


def flat(t: Tensor) -> Tensor:
    """A 1-D alias for a kernel argument (contiguous tensors; see :func:`flat_ok`).

    ``detach()`` drops the view's ``_base``: dynamo would otherwise guard on the base's
    shape and recompile for every parameter rank.
    """
    return t.view(-1).detach()


def flat_grad(t: Tensor) -> Tensor:
    """A 1-D alias of a gradient, copied only when it is not contiguous."""
    return t.reshape(-1).detach()


def flat_opt(t: Tensor | None) -> Tensor | None:
    """:func:`flat` for optional state (a kernel flag that is off passes None)."""
    return None if t is None else flat(t)
