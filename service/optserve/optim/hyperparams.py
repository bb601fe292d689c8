"""Hyperparameter models: torch's names and defaults, validated strictly at the service edge.

Strict mode so that ``"lr": "abc"`` or ``"lr": true`` is rejected instead of coerced; ints
are still accepted for float fields (``"momentum": 0`` is a natural thing to send).
Ranges follow ``torch.optim`` except ``alpha``, which must be below 1 as the RMSprop document
has it (torch accepts any alpha >= 0). Models are frozen, hence hashable: the fused path
caches per-hyperparameter scalar tensors on them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from optserve_client import spec

_RMS, _ADA, _SGD = (spec.TORCH_DEFAULTS[n] for n in ("rmsprop", "adagrad", "sgd"))

NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A finite float >= 0 (lr, eps, weight_decay, momentum, lr_decay, ...)."""

Alpha = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
"""RMSprop's smoothing constant: 0 <= alpha < 1."""


class Hyperparams(BaseModel):
    """Common base: forbid unknown names, no coercion, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def torch_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the matching ``torch.optim`` constructor."""
        return self.model_dump()


class RMSpropHyperparams(Hyperparams):
    """``torch.optim.RMSprop`` hyperparameters (lr=0.01, alpha=0.99, eps=1e-8, ...)."""

    lr: NonNegFloat = _RMS["lr"]
    alpha: Alpha = _RMS["alpha"]
    eps: NonNegFloat = _RMS["eps"]
    weight_decay: NonNegFloat = _RMS["weight_decay"]
    momentum: NonNegFloat = _RMS["momentum"]
    centered: bool = _RMS["centered"]
    maximize: bool = _RMS["maximize"]


class AdagradHyperparams(Hyperparams):
    """``torch.optim.Adagrad`` hyperparameters (lr=0.01, eps=1e-10, ...)."""

    lr: NonNegFloat = _ADA["lr"]
    lr_decay: NonNegFloat = _ADA["lr_decay"]
    weight_decay: NonNegFloat = _ADA["weight_decay"]
    initial_accumulator_value: NonNegFloat = _ADA["initial_accumulator_value"]
    eps: NonNegFloat = _ADA["eps"]
    maximize: bool = _ADA["maximize"]


class SGDHyperparams(Hyperparams):
    """``torch.optim.SGD`` hyperparameters (lr=0.001 as of torch 2.x, ...)."""

    lr: NonNegFloat = _SGD["lr"]
    momentum: NonNegFloat = _SGD["momentum"]
    dampening: NonNegFloat = _SGD["dampening"]
    weight_decay: NonNegFloat = _SGD["weight_decay"]
    nesterov: bool = _SGD["nesterov"]
    maximize: bool = _SGD["maximize"]

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, v: bool, info: ValidationInfo) -> bool:
        """Same rule as torch, reported on the ``nesterov`` field so the 422 names it."""
        if v:
            momentum = info.data.get("momentum")
            dampening = info.data.get("dampening")
            if momentum is not None and momentum <= 0:
                raise ValueError("nesterov=true needs momentum > 0")
            if dampening is not None and dampening != 0:
                raise ValueError("nesterov=true needs dampening == 0")
        return v


PRESETS = spec.PRESETS
"""The RMSprop document's "common configurations": name -> (optimizer, hyperparams)."""
