"""The optimizer math of optserve: pure functions over dicts of named tensors.

No HTTP, no Redis. The default ``kernel="exact"`` is bitwise equal to ``torch.optim`` on
the parameters' device (:mod:`optserve.optim.exact`); ``kernel="compiled"`` is a
``torch.compile``d one-pass update, close but not bitwise (:mod:`optserve.optim.fused`).

    opt = get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({"lr": 0.01})
    step(opt, params, grads, state, hp)                       # exact
    step(opt, params, grads, state, hp, kernel="compiled")    # opt-in
"""

from __future__ import annotations

# torch state_dict <-> the service's state export: one converter, the SDK's.
from optserve_client.state import from_torch_state_dict, to_torch_state_dict

from .base import OptimizerDef, ParamState
from .core import (
    GRAD_DTYPES,
    KERNELS,
    OPTIMIZERS,
    KernelName,
    UnknownOptimizerError,
    all_finite,
    effective_lr,
    finite,
    get_optimizer,
    step,
)
from .fused import warmup
from .hyperparams import (
    PRESETS,
    AdagradHyperparams,
    Hyperparams,
    RMSpropHyperparams,
    SGDHyperparams,
)

__all__ = [
    "GRAD_DTYPES",
    "KERNELS",
    "OPTIMIZERS",
    "PRESETS",
    "AdagradHyperparams",
    "Hyperparams",
    "KernelName",
    "OptimizerDef",
    "ParamState",
    "RMSpropHyperparams",
    "SGDHyperparams",
    "UnknownOptimizerError",
    "all_finite",
    "effective_lr",
    "finite",
    "from_torch_state_dict",
    "get_optimizer",
    "step",
    "to_torch_state_dict",
    "warmup",
]
