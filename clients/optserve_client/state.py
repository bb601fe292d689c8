"""Between the service's state export and torch's optimizer ``state_dict``: the one converter,
used by the SDK's optimizers and re-exported by the server (``optserve.optim``).

The service exports a session (``GET /v1/sessions/{id}/state``) as safetensors tensors
``param.<name>`` and ``state.<name>.<key>`` (``step`` 0-dim) plus metadata
``{optimizer, hyperparams, version}``; torch keeps the same tensors under integer indices
in ``state_dict()["state"]`` with the hyperparameters in ``param_groups``. These helpers
convert both ways and move whole optimizers between a local process and the service.
torch is imported only by the functions that produce torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._codec import is_torch
from ._codec import plain_hyperparams as plain_hyperparams
from ._results import Session
from .errors import PreconditionRequiredError
from .spec import STATE_KEYS, TORCH_DEFAULTS

__all__ = [
    "export_torch_state_dict",
    "from_torch_state_dict",
    "optimizer_name",
    "param_names_of",
    "session_from_torch",
    "split_state",
    "to_torch_state_dict",
]

TORCH_CLASSES = {"rmsprop": "RMSprop", "adagrad": "Adagrad", "sgd": "SGD"}
"""``torch.optim``'s class of each optimizer."""


def _torch_optimizer(opt: str, hyperparams: Mapping[str, Any], param: Any = None) -> Any:
    """The installed torch's own optimizer over one tensor (a dummy by default): its group
    has exactly the keys (foreach, capturable, fused, ...) ``load_state_dict`` expects, and
    its state is the initial state of an optimizer that builds state up front (Adagrad)."""
    import torch

    cls = getattr(torch.optim, TORCH_CLASSES[opt])
    tensor = torch.zeros(0) if param is None else _as_torch(param).detach()
    return cls([tensor], **{**TORCH_DEFAULTS[opt], **hyperparams})


def torch_group(opt: str, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
    """torch's param_group for these hyperparameters, without ``params``."""
    group = _torch_optimizer(opt, hyperparams).state_dict()["param_groups"][0]
    return {k: v for k, v in group.items() if k != "params"}


def optimizer_name(opt: Any) -> str:
    """"rmsprop" | "adagrad" | "sgd" for a torch optimizer (or a name)."""
    if isinstance(opt, str):
        name = opt.lower()
    else:
        name = getattr(opt, "_optserve_optimizer", None) or type(opt).__name__.lower()
    if name not in TORCH_DEFAULTS:
        raise ValueError(f"optserve serves {sorted(TORCH_DEFAULTS)}, not {name!r}")
    return name


def param_names_of(tensors: Mapping[str, Any]) -> list[str]:
    """The parameter names of a state export, in the export's order."""
    return [k[len("param."):] for k in tensors if k.startswith("param.")]


def split_state(tensors: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``param.<name>`` / ``state.<name>.<key>`` -> (params, {name: {key: tensor}}).

    State keys never hold a dot, so the name is everything between ``state.`` and the
    last dot: parameter names may contain dots (``fc1.weight``).
    """
    params: dict[str, Any] = {}
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("param."):
            params[key[len("param."):]] = value
        elif key.startswith("state.") and "." in key[len("state."):]:
            name, sub = key[len("state."):].rsplit(".", 1)
            state.setdefault(name, {})[sub] = value
        else:
            raise ValueError(f"not a state tensor name: {key!r}")
    return params, state


def _as_torch(value: Any) -> Any:
    import torch

    if is_torch(value):
        return value
    return torch.from_numpy(np.array(value, copy=True))


def to_torch_state_dict(tensors: Mapping[str, Any], meta: Mapping[str, Any],
                        names: Sequence[str] | None = None, *, index_offset: int = 0,
                        param_names: bool = True, params: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """A service state export as ``torch.optim.<Optimizer>.state_dict()``.

    ``names`` fixes the parameter order (torch's indices); default: the export's order.
    Loads with ``torch.optim.RMSprop(params).load_state_dict(...)`` when ``params`` are in
    that order. State tensors are shared, not copied, as torch's own ``state_dict()`` does.
    Adagrad builds state for every parameter up front: one without state here gets that
    initial state, built from its tensor (``param.<name>``, or ``params``).
    """
    opt = optimizer_name(meta.get("optimizer", "rmsprop"))
    exported, per_name = split_state(tensors)
    exported.update(params or {})
    order = list(names) if names is not None else list(exported)
    unknown = set(per_name) - set(order)
    if unknown:
        raise ValueError(f"state for parameters not in names: {sorted(unknown)}")
    hyperparams = dict(meta.get("hyperparams") or {})
    eager = bool(_torch_optimizer(opt, hyperparams).state)
    state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(order):
        if per_name.get(name):
            state[index_offset + i] = {k: _as_torch(v) for k, v in per_name[name].items()}
        elif eager:
            if name not in exported:
                raise ValueError(f"{opt}: parameter {name!r} has no state yet; pass "
                                 "params= so its initial state can be built")
            init = _torch_optimizer(opt, hyperparams, exported[name]).state_dict()["state"]
            state[index_offset + i] = dict(init[0])
    group = torch_group(opt, hyperparams)
    if param_names:
        group["param_names"] = order
    group["params"] = [index_offset + i for i in range(len(order))]
    return {"state": state, "param_groups": [group]}


def _flat_params(params: Any) -> tuple[list[str] | None, list[Any]]:
    """(names or None, tensors) from a mapping, (name, tensor) pairs or plain tensors."""
    if isinstance(params, Mapping):
        return list(params), list(params.values())
    items = list(params)
    if items and isinstance(items[0], tuple):
        return [n for n, _ in items], [t for _, t in items]
    return None, items


def from_torch_state_dict(state_dict: Mapping[str, Any],
                          params: Mapping[str, Any] | Iterable[Any],
                          optimizer: str = "rmsprop", *, group: int | None = None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torch optimizer ``state_dict`` (+ its parameters) as a service state import.

    ``params`` are the optimizer's parameters in its order: ``model.named_parameters()``,
    a name->tensor dict, or plain tensors (named "0", "1", ...). Names saved in the groups'
    ``param_names`` win. One session holds one hyperparameter set, so a state_dict with
    several groups needs ``group=`` unless their hyperparameters are equal.
    Returns ``(tensors, meta)`` for `Client.put_state`.
    """
    opt = optimizer_name(optimizer)
    given_names, given = _flat_params(params)
    groups = list(state_dict["param_groups"])
    hp_keys = list(TORCH_DEFAULTS[opt])
    hps = [{k: g[k] for k in hp_keys if k in g} for g in groups]
    if group is not None:
        chosen = [group]
    elif all(h == hps[0] for h in hps):
        chosen = list(range(len(groups)))
    else:
        raise ValueError("param groups with different hyperparameters: pick one with group=")
    # torch numbers parameters across groups in order; map index -> position in `params`.
    position: dict[int, int] = {}
    pos = 0
    for g in groups:
        for idx in g["params"]:
            position[idx] = pos
            pos += 1
    if len(given) < pos and not isinstance(params, Mapping):
        raise ValueError(f"state_dict has {pos} parameters, {len(given)} names given")
    tensors: dict[str, Any] = {}
    state = state_dict.get("state", {})
    for gi in chosen:
        g = groups[gi]
        saved_names = g.get("param_names")
        for j, idx in enumerate(g["params"]):
            p = position[idx]
            if saved_names is not None:
                name = saved_names[j]
            elif given_names is not None:
                if p >= len(given_names):
                    raise ValueError(f"state_dict has {pos} parameters, "
                                     f"{len(given_names)} names given")
                name = given_names[p]
            else:
                name = str(idx)
            by_name = isinstance(params, Mapping) and name in params
            tensor = params[name] if by_name else given[p]  # type: ignore[index]
            tensors[f"param.{name}"] = _detach(tensor)
            for key, value in (state.get(idx) or state.get(str(idx)) or {}).items():
                if key not in STATE_KEYS[opt]:
                    raise ValueError(f"{opt}: unknown state entry {key!r} for {name!r}")
                if value is not None:  # SGD without momentum keeps momentum_buffer None
                    tensors[f"state.{name}.{key}"] = _state_value(key, value, tensor)
    meta = {"optimizer": opt, "hyperparams": plain_hyperparams(hps[chosen[0]]), "version": 0}
    return tensors, meta


def _detach(t: Any) -> Any:
    return t.detach().cpu().contiguous() if is_torch(t) else np.ascontiguousarray(t)


def _state_value(key: str, value: Any, param: Any) -> Any:
    """torch's load_state_dict casts state to the parameter's dtype, ``step`` to float32."""
    if key == "step":
        if is_torch(value):
            return value.detach().cpu().to(dtype=_torch_float32()).reshape(())
        return np.asarray(value, dtype=np.float32).reshape(())
    if is_torch(value):
        out = value.detach().cpu()
        if is_torch(param):
            out = out.to(dtype=param.dtype)
        return out.contiguous()
    return np.ascontiguousarray(value, dtype=getattr(param, "dtype", None))


def _torch_float32() -> Any:
    import torch

    return torch.float32


# --------------------------------------------------------------------- with a client


def export_torch_state_dict(client: Any, session_id: str | Session,
                            names: Sequence[str] | None = None) -> tuple[dict[str, Any],
                                                                        dict[str, Any]]:
    """(``state_dict``, params) of a session, for a local ``torch.optim`` optimizer.

    Parameters are numbered in ``names`` order (default: the order the session declared
    them in, i.e. the creating optimizer's order)::

        sd, params = export_torch_state_dict(client, sid)
        tensors = [params[n] for n in sd["param_groups"][0]["param_names"]]
        opt = torch.optim.RMSprop(tensors); opt.load_state_dict(sd)
    """
    if names is None:  # the order the parameters were declared in (the export sorts them)
        names = list(client.get_session(session_id).tensors)
    tensors, meta = client.get_state(session_id, as_="torch")
    params, _ = split_state(tensors)
    return to_torch_state_dict(tensors, meta, names), params


def session_from_torch(client: Any, optimizer: Any, params: Mapping[str, Any] | Iterable[Any],
                       *, optimizer_type: str | None = None, group: int | None = None,
                       **create_kwargs: Any) -> Session:
    """Start a session from a local optimizer (or its ``state_dict()``) and its parameters.

    ``optimizer`` is a ``torch.optim.RMSprop``/``Adagrad``/``SGD`` or a state_dict (then
    ``optimizer_type`` says which, default "rmsprop"). ``create_kwargs`` go to
    `Client.create_session` (``mode``, ``name``, ...). The session starts at the local
    optimizer's step counts and buffers, so training continues bit for bit.
    """
    if isinstance(optimizer, Mapping):
        name = optimizer_name(optimizer_type or "rmsprop")
        sd = optimizer
    else:
        name = optimizer_name(optimizer_type or optimizer)
        sd = optimizer.state_dict()
    tensors, meta = from_torch_state_dict(sd, params, name, group=group)
    session = client.create_session(name, meta["hyperparams"], **create_kwargs)
    try:
        try:
            doc = client.put_state(session.id, tensors, meta)
        except PreconditionRequiredError:
            current = client.get_session(session.id)
            doc = client.put_state(session.id, tensors, meta, if_match=current.version)
    except BaseException:
        client.delete_session(session.id)
        raise
    return doc if doc is not None else client.get_session(session.id)
