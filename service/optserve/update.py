"""The in-place optimizer update of one step, and the refusal of non-finite results.

Runs on torch tensors already loaded (maybe in a worker thread): apply the optimizer, prove
the result finite (cheaply from the update norm, exactly when that cannot), and pack the
changed tensors as the Redis fields to write. No Redis, no locks: the engine does those.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from optserve_client.spec import ACCUMULATORS
from optserve_client.wire import WireTensor

from . import optim
from .cache import Loaded, nbytes
from .errors import DomainError
from .optim import native_fast
from .session import SessionMeta
from .store import keys
from .tensors import from_bytes


def numel(t: WireTensor | torch.Tensor) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else t.numel


def grad_nbytes(t: WireTensor | torch.Tensor) -> int:
    return nbytes(t) if isinstance(t, torch.Tensor) else t.data.nbytes


def _accumulators_finite(opt: optim.OptimizerDef, loaded: Loaded, names: list[str]) -> bool:
    """Whether square_avg / AdaGrad's sum stayed finite. An overflow there makes the update
    0, not inf, so the update norm cannot see it. They are >= 0, so a finite sum proves it:
    one read-only reduction (a sum that overflows sends the caller to the exact check)."""
    key = ACCUMULATORS.get(opt.name)
    if key is None:
        return True
    for n in names:
        t = loaded.state.get(n, {}).get(key)
        if t is not None and t.numel() and not math.isfinite(float(t.sum())):
            return False
    return True


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    """The 2-norm over several tensors; float32 sums, float64 only when those overflow."""
    ts = [t for t in tensors if t.numel()]
    total = math.sqrt(sum(float(torch.linalg.vector_norm(t)) ** 2 for t in ts))
    if math.isinf(total):
        total = math.sqrt(sum(
            float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in ts))
    return total


def momentum_switched_on(meta: SessionMeta, new_meta: SessionMeta | None,
                         loaded: Loaded) -> list[str]:
    """As PATCH does: momentum switched on starts from a fresh buffer, not one left from
    an earlier stretch with it. Drops those buffers; returns their fields."""
    if new_meta is None or meta.hyperparams.get("momentum", 0) != 0 \
            or new_meta.hyperparams.get("momentum", 0) == 0:
        return []
    stale = []
    for name, st in loaded.state.items():
        if st.pop("momentum_buffer", None) is not None:
            stale.append(keys.state_field(name, "momentum_buffer"))
    return stale


def apply(opt: optim.OptimizerDef, hp: Any, loaded: Loaded,
          grads: Mapping[str, WireTensor | torch.Tensor], *,
          device: torch.device, kernel: optim.KernelName
          ) -> tuple[list[str], dict[str, float | None]]:
    """The optimizer's step in place on `loaded`; the touched names and the step's norms."""
    if kernel == "exact" and torch.device(device).type == "cpu" and opt.name == "rmsprop" \
            and all(isinstance(g, WireTensor) for g in grads.values()):
        with torch.no_grad():
            sums = native_fast.step(loaded.params, loaded.state, grads,  # type: ignore[arg-type]
                                    hp, loaded.kernel_memo)
        if sums is not None:
            return _finish(opt, loaded, grads, sums,
                           {n: t.update_sq for n, t in sums.items()}, [], device)
    tgrads = {
        n: w.to(device) if isinstance(w, torch.Tensor)
        else from_bytes(w.data, w.dtype, w.shape, device, writable=False)
        for n, w in grads.items()
    }
    with torch.no_grad():
        totals: dict[str, Any] = {}  # the native kernel's sums, by name (see optim.step)
        update_sq = optim.step(opt, loaded.params, tgrads, loaded.state, hp,
                               kernel=kernel, track_update=True, totals=totals)
    return _finish(opt, loaded, tgrads, totals, update_sq,
                   [t for n, t in tgrads.items() if n not in totals], device)


def _finish(opt: optim.OptimizerDef, loaded: Loaded,
            grads: Mapping[str, WireTensor | torch.Tensor], totals: Mapping[str, Any],
            update_sq: Mapping[str, float], rest: list[torch.Tensor], device: torch.device
            ) -> tuple[list[str], dict[str, float | None]]:
    """The step's norms, and its refusal when it made anything non-finite. `rest`: the
    gradients the native kernel did not sum (read-only: their norm after the step is the
    norm before it)."""
    touched = sorted(grads)
    with torch.no_grad():
        grad_norm = math.sqrt(_norm(rest) ** 2 + sum(t.grad_sq for t in totals.values()))
        # The old parameters are finite, so a finite update norm proves the new ones are:
        # the norm (from the compiled or native kernel's own pass) serves as the check.
        update_norm: float | None = math.sqrt(sum(update_sq.values()))
        acc_ok = all(math.isfinite(t.acc_sum) for t in totals.values()) \
            and _accumulators_finite(opt, loaded, [n for n in touched if n not in totals])
        if not math.isfinite(update_norm) or not acc_ok:
            tgrads = {n: w if isinstance(w, torch.Tensor)
                      else from_bytes(w.data, w.dtype, w.shape, device, writable=False)
                      for n, w in grads.items()}
            refuse_non_finite(loaded, tgrads, touched)  # exact; this path is rare
            if not math.isfinite(update_norm):
                update_norm = None  # a float32 sum overflowed; the tensors are finite
    stats = {keys.LAST_GRAD_NORM: grad_norm, keys.LAST_UPDATE_NORM: update_norm}
    # None (unknown) clears the stored value rather than leaving the last step's.
    return touched, {k: v if v is not None and math.isfinite(v) else None
                     for k, v in stats.items()}


def refuse_non_finite(loaded: Loaded, grads: Mapping[str, torch.Tensor],
                      touched: list[str]) -> None:
    """Refuse a step that made parameters or optimizer state NaN or infinite."""
    params_ok = optim.all_finite(loaded.params[n] for n in touched)
    state_ok = optim.all_finite(t for n in touched for t in loaded.state.get(n, {}).values())
    if params_ok and state_ok:
        return
    for n in touched:
        g = grads[n]
        if not optim.finite(g):
            raise DomainError("non_finite_gradient", f"gradient {n!r} has NaN or "
                              "infinite values; nothing was applied", tensor=n)
    what = "parameters" if not params_ok else "optimizer state (e.g. square_avg overflowed)"
    raise DomainError("non_finite_result", f"this step would make the {what} NaN or "
                      "infinite; nothing was applied", current_version=loaded.version)
