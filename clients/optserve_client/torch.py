"""torch's optimizer names and defaults over `RemoteOptimizer` (see `optserve_client._remote`).

Swap ``torch.optim.RMSprop(model.parameters(), lr=...)`` for
``RemoteRMSprop(model.named_parameters(), lr=..., url=...)``: the training loop stays the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._remote import RemoteOptimizer
from ._results import Session
from .spec import TORCH_DEFAULTS

__all__ = ["RemoteAdagrad", "RemoteOptimizer", "RemoteRMSprop", "RemoteSGD"]

_RMS, _ADA, _SGD = (TORCH_DEFAULTS[n] for n in ("rmsprop", "adagrad", "sgd"))


class RemoteRMSprop(RemoteOptimizer):
    """``torch.optim.RMSprop`` with the state and update in the service."""

    def __init__(self, params: Iterable[Any], lr: float = _RMS["lr"],
                 alpha: float = _RMS["alpha"], eps: float = _RMS["eps"],
                 weight_decay: float = _RMS["weight_decay"], momentum: float = _RMS["momentum"],
                 centered: bool = _RMS["centered"], maximize: bool = _RMS["maximize"], *,
                 url: str | None = None,
                 session: str | Session | Sequence[str | Session] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, "rmsprop", url=url, session=session, lr=lr, alpha=alpha,
                         eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, maximize=maximize, **kwargs)


class RemoteAdagrad(RemoteOptimizer):
    """``torch.optim.Adagrad`` with the state and update in the service."""

    def __init__(self, params: Iterable[Any], lr: float = _ADA["lr"],
                 lr_decay: float = _ADA["lr_decay"], weight_decay: float = _ADA["weight_decay"],
                 initial_accumulator_value: float = _ADA["initial_accumulator_value"],
                 eps: float = _ADA["eps"], maximize: bool = _ADA["maximize"], *,
                 url: str | None = None,
                 session: str | Session | Sequence[str | Session] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, "adagrad", url=url, session=session, lr=lr,
                         lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize, **kwargs)


class RemoteSGD(RemoteOptimizer):
    """``torch.optim.SGD`` with the state and update in the service."""

    def __init__(self, params: Iterable[Any], lr: float = _SGD["lr"],
                 momentum: float = _SGD["momentum"], dampening: float = _SGD["dampening"],
                 weight_decay: float = _SGD["weight_decay"], nesterov: bool = _SGD["nesterov"],
                 maximize: bool = _SGD["maximize"], *, url: str | None = None,
                 session: str | Session | Sequence[str | Session] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(params, "sgd", url=url, session=session, lr=lr, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, **kwargs)
