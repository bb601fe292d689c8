"""A whole optimizer state as named tensors: ``param.<name>`` and ``state.<name>.<key>``.

Export reads the tensor hash as it is; import checks every tensor against the optimizer
(``optserve_client.spec.STATE_KEYS``) and the parameters it carries, before anything is
written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from optserve_client import wire
from optserve_client.spec import ACCUMULATORS, STATE_KEYS, STEP_KEY

from .checks import check_finite, check_param_body, validate_hyperparams
from .errors import DomainError
from .session import SessionMeta
from .store import keys

PARAM, STATE = "param.", "state."


def export(meta: SessionMeta, fields: Mapping[str, bytes]) -> dict[str, wire.WireTensor]:
    """The session's tensors under their state-file names, in field order, no copies."""
    out: dict[str, wire.WireTensor] = {}
    for fname, raw in sorted(fields.items()):
        parsed = keys.parse_field(fname)
        if parsed is None or parsed[1] not in meta.tensors:
            continue
        kind, name, key = parsed
        spec = meta.tensors[name]
        if kind == "p":
            out[f"{PARAM}{name}"] = wire.WireTensor(spec.dtype, spec.shape, memoryview(raw))
        elif key == STEP_KEY:
            out[f"{STATE}{name}.{STEP_KEY}"] = wire.WireTensor("float32", (), memoryview(raw))
        else:
            out[f"{STATE}{name}.{key}"] = wire.WireTensor(spec.dtype, spec.shape,
                                                         memoryview(raw))
    return out


@dataclass(frozen=True)
class StateImport:
    """A checked state file: what the session becomes and the hash fields that hold it."""

    optimizer: str
    hyperparams: dict[str, Any]
    params: dict[str, wire.WireTensor]
    fields: dict[str, Any]
    steps: int


def parse_import(meta: SessionMeta, tensors: Mapping[str, wire.WireTensor],
                 metadata: Mapping[str, str] | None) -> StateImport:
    """Check a state file against the session (as read under its lock)."""
    info = _metadata(metadata)
    optimizer = info.get("optimizer", meta.optimizer)
    if optimizer not in STATE_KEYS:
        raise DomainError("invalid_hyperparams", f"unknown optimizer {optimizer!r}")
    hp = validate_hyperparams(optimizer, info.get(
        "hyperparams", meta.hyperparams if optimizer == meta.optimizer else {}))
    params = {n.removeprefix(PARAM): t for n, t in tensors.items() if n.startswith(PARAM)}
    check_param_body(meta.tensors or None, params)
    check_finite(params, "cpu", "parameter")
    fields: dict[str, Any] = {keys.param_field(n): t.data for n, t in params.items()}
    for name, t in tensors.items():
        if name.startswith(PARAM):
            continue
        fields[_field(name, t, params, optimizer)] = _state_bytes(name, t)
    # Imported state counts as stepped (optimizer and centered are then fixed).
    steps = max((int(_step_value(t)) for n, t in tensors.items()
                 if n.endswith(f".{STEP_KEY}")),
                default=int(any(n.startswith(STATE) for n in tensors)))
    return StateImport(optimizer, hp, params, fields, steps)


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    if not metadata or "optserve" not in metadata:
        return {}
    try:
        info = json.loads(metadata["optserve"])
    except (ValueError, RecursionError):  # not JSON, too deep, a 5,000-digit integer
        raise DomainError("invalid_state", "__metadata__.optserve is not JSON") from None
    if not isinstance(info, dict):
        raise DomainError("invalid_state", "__metadata__.optserve must be a JSON object")
    return info


def _field(name: str, t: wire.WireTensor, params: Mapping[str, wire.WireTensor],
           optimizer: str) -> str:
    if not name.startswith(STATE) or name.count(".") < 2:
        raise DomainError("invalid_state", f"tensor {name!r} is neither param.<name> nor "
                          "state.<name>.<key>", tensor=name)
    pname, _, key = name.removeprefix(STATE).rpartition(".")
    if pname not in params:
        raise DomainError("invalid_state", f"state {name!r} is for unknown parameter "
                          f"{pname!r}", tensor=name)
    allowed = STATE_KEYS[optimizer]
    if key not in allowed:
        raise DomainError("invalid_state", f"{optimizer} has no state {key!r}; it has "
                          f"{sorted(allowed)}", tensor=name)
    p = params[pname]
    if key == STEP_KEY:
        if t.shape != () or t.dtype not in ("float32", "float64"):
            raise DomainError("invalid_state", f"{name} must be a 0-dim float tensor",
                              tensor=name)
    elif t.shape != p.shape or t.dtype != p.dtype:
        raise DomainError("invalid_state", f"{name} must have the parameter's shape "
                          f"{list(p.shape)} and dtype {p.dtype}", tensor=name)
    return keys.state_field(pname, key)


def _step_value(t: wire.WireTensor) -> float:
    return float(wire.to_numpy(t).reshape(()))


def _state_bytes(name: str, t: wire.WireTensor) -> Any:
    if name.endswith(f".{STEP_KEY}"):
        value = _step_value(t)
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise DomainError("invalid_state", f"{name} must be a non-negative whole number",
                              tensor=name)
        return torch.tensor(value, dtype=torch.float32).numpy().tobytes()
    arr = wire.to_numpy(t)
    if arr.size and not np.isfinite(arr).all():
        raise DomainError("invalid_state", f"{name} has NaN or infinite values", tensor=name)
    if name.endswith(tuple(f".{k}" for k in ACCUMULATORS.values())) and arr.size \
            and (arr < 0).any():
        raise DomainError("invalid_state", f"{name} is an average of squares: it cannot be "
                          "negative", tensor=name)
    return t.data
