"""The optimizer math of optserve: pure functions over dicts of named tensors.

No HTTP, no Redis. The plain path is bitwise equal to ``torch.optim`` on CPU; the fused
path is a ``torch.compile``d one-pass update (see :mod:`optserve.optim.fused`).

    opt = get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({"lr": 0.01})
    step(opt, params, grads, state, hp, fused=False)
"""

from __future__ import annotations

# torch state_dict <-> the service's state export: one converter, the SDK's.
from optserve_client.state import from_torch_state_dict, to_torch_state_dict

from .base import OptimizerDef, ParamState
from .core import (
    GRAD_DTYPES,
    OPTIMIZERS,
    UnknownOptimizerError,
    all_finite,
    effective_lr,
    get_optimizer,
    step,
)
from .fused import fused_mode, set_fused_mode, warmup
from .hyperparams import (
    PRESETS,
    AdagradHyperparams,
    Hyperparams,
    RMSpropHyperparams,
    SGDHyperparams,
)

__all__ = [
    "GRAD_DTYPES",
    "OPTIMIZERS",
    "PRESETS",
    "AdagradHyperparams",
    "Hyperparams",
    "OptimizerDef",
    "ParamState",
    "RMSpropHyperparams",
    "SGDHyperparams",
    "UnknownOptimizerError",
    "all_finite",
    "effective_lr",
    "from_torch_state_dict",
    "fused_mode",
    "get_optimizer",
    "set_fused_mode",
    "step",
    "to_torch_state_dict",
    "warmup",
]
