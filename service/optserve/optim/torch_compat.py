"""Conversion to and from ``torch.optim.<X>.state_dict()``, so runs can move both ways.

Group keys come from the installed torch itself (an optimizer built over a dummy tensor),
so ``foreach``, ``capturable``, ``differentiable``, ``fused`` and whatever a later torch adds
are always the ones ``load_state_dict`` expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import OptimizerDef, ParamState


def _torch_group(opt: OptimizerDef, hp: Any) -> dict[str, Any]:
    """Torch's param_group entry for ``hp`` (everything but ``params``)."""
    dummy = torch.zeros(0)
    group = opt.torch_class([dummy], **hp.torch_kwargs()).state_dict()["param_groups"][0]
    return {k: v for k, v in group.items() if k != "params"}


def to_torch_state_dict(opt: OptimizerDef, hp: Any, names: Sequence[str],
                        state: Mapping[str, ParamState], *,
                        params: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """What ``opt.torch_class([params in names order], **hp).state_dict()`` would hold.

    State tensors are shared, not copied, as torch's own ``state_dict()`` does. Adagrad
    builds state for every parameter in ``__init__``; a parameter that never had a gradient
    here gets that initial state, which needs its tensor from ``params``.
    """
    if not isinstance(hp, opt.hyperparams):
        raise TypeError(f"{opt.name} needs {opt.hyperparams.__name__}, got {type(hp).__name__}")
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"state for parameters not in names: {unknown}")
    packed: dict[int, dict[str, Any]] = {}
    for index, name in enumerate(names):
        st = state.get(name)
        if st:
            packed[index] = dict(st)
        elif opt.eager_state:
            if params is None or name not in params:
                raise ValueError(f"{opt.name}: parameter {name!r} has no state yet; pass "
                                 "params= so its initial state can be built")
            packed[index] = opt.init_state(params[name], hp)
    group = _torch_group(opt, hp)
    group["params"] = list(range(len(names)))
    return {"state": packed, "param_groups": [group]}


def from_torch_state_dict(opt: OptimizerDef, sd: Mapping[str, Any], names: Sequence[str]
                          ) -> tuple[Any, dict[str, ParamState]]:
    """Hyperparameters and per-name state from a torch ``state_dict()`` (tensors copied).

    ``names`` are the parameter names in the order the torch optimizer was given its
    parameters. Several param groups are accepted only with equal hyperparameters.
    """
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise ValueError("state_dict has no param_groups")
    fields = opt.hyperparams.model_fields
    hp_values: dict[str, Any] | None = None
    index_to_name: dict[int, str] = {}
    position = 0
    for group in groups:
        values = {k: _plain(group[k]) for k in fields if k in group}
        if hp_values is None:
            hp_values = values
        elif values != hp_values:
            raise ValueError("param groups with different hyperparameters are not supported")
        for index in group.get("params", []):
            if position >= len(names):
                raise ValueError(f"state_dict has more parameters than the {len(names)} names")
            index_to_name[int(index)] = names[position]
            position += 1
    if position != len(names):
        raise ValueError(f"state_dict has {position} parameters, {len(names)} names given")
    hp = opt.hyperparams.model_validate(hp_values or {})

    state: dict[str, ParamState] = {}
    for index, entry in sd.get("state", {}).items():
        name = index_to_name.get(int(index))
        if name is None:
            raise ValueError(f"state_dict has state for unknown parameter index {index}")
        st: ParamState = {}
        for key, value in entry.items():
            if key not in opt.state_keys:
                raise ValueError(f"{opt.name}: unknown state entry {key!r} for {name!r}")
            if value is None:
                continue
            if key == "step":
                st[key] = torch.tensor(float(value), dtype=torch.float32)
            else:
                st[key] = value.detach().clone()
        if st:
            state[name] = st
    return hp, state


def _plain(value: Any) -> Any:
    """A tensor-valued hyperparameter (torch allows a tensor lr) as a Python number."""
    if isinstance(value, Tensor):
        return value.item()
    return value
