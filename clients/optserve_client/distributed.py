"""Data-parallel training through one optserve session: K workers, one optimizer.

The workers themselves (`SyncWorker`, `AsyncWorker`, sync and async modes) live in
`optserve_client.workers` and are re-exported here. `DataParallelOptimizer` wraps either for
a torch model: ``step()`` pushes the ``.grad`` of each named parameter and writes the
parameters that come back into the model in place; torch is imported only by it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._codec import dense_grad, named
from ._results import Session
from .client import Client
from .rendezvous import SESSION_ENV, launch_rank_world, shared_session
from .workers import (
    AsyncWorker,
    Grads,
    OnStale,
    Params,
    StepReport,
    SyncWorker,
    create_async_session,
    create_sync_session,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "AsyncWorker",
    "DataParallelOptimizer",
    "StepReport",
    "SyncWorker",
    "create_async_session",
    "create_sync_session",
]


class DataParallelOptimizer:
    """A torch-style optimizer for one data-parallel worker of a shared session.

    ``params``: ``model.named_parameters()``, a model, or a name -> tensor mapping whose
    names are the session's. On creation the model takes the session's current parameters
    (``pull=True``), so every worker starts from the same point. ``step()`` pushes each
    parameter's ``.grad`` (parameters without one are left out, as torch leaves them
    alone) and copies the returned parameters into the tensors in place.

    The session's mode picks the worker: sync (`SyncWorker`, ``weight`` per step, e.g.
    ``step(weight=len(batch))``) or async (`AsyncWorker`; with ``on_stale="recompute"``,
    ``step(closure)`` needs the usual torch closure that zeroes the grads, runs forward and
    backward and returns the loss: it is called again on the fresh parameters).

    Launched by torchrun (or any launcher that sets ``RANK`` and ``WORLD_SIZE``): ``rank``
    and ``world_size`` default to those variables; explicit arguments win (``LOCAL_RANK``
    is not used: device placement is the model's). ``session`` may then be a *name*,
    default ``$OPTSERVE_SESSION``: rank 0 creates a sync session of that name for
    ``world_size`` contributions (or, given ``target_weight``, rounds closing when the
    ranks' ``step(weight=...)`` add up to it) from its model (``optimizer``,
    ``hyperparams``, rounds closing ``round_timeout_s`` after their first push) unless one
    exists; the other ranks wait up to ``wait_s`` for it and attach (see
    `optserve_client.rendezvous`). An existing session of that name is attached by all
    ranks: the launch continues it. Without a known world size nothing is created:
    ``session`` must name an existing session.
    """

    def __init__(self, params: Any, client: Client, session: str | Session | None = None,
                 *, weight: float | None = None, rank: int | None = None,
                 world_size: int | None = None, on_stale: OnStale = "recompute",
                 max_recomputes: int = 3, round_retries: int = 2,
                 grad_dtype: str | None = None, pull: bool = True,
                 optimizer: str = "rmsprop", hyperparams: Mapping[str, Any] | None = None,
                 round_timeout_s: float = 60.0, target_weight: float | None = None,
                 wait_s: float = 120.0) -> None:
        import torch  # noqa: F401  (the torch part of the SDK)

        self.tensors: dict[str, torch.Tensor] = named(params)
        rank, world_size = launch_rank_world(rank, world_size)
        session = session or os.environ.get(SESSION_ENV)
        if not session:
            raise ValueError(f"no session: pass one or set ${SESSION_ENV}")
        if isinstance(session, Session) or world_size is None:
            doc = client.get_session(session)
        else:
            doc = shared_session(client, session, rank=rank, wait_s=wait_s, create=(
                lambda name: create_sync_session(
                    client, self.tensors, None if target_weight else world_size,
                    timeout_s=round_timeout_s, target_weight=target_weight,
                    optimizer=optimizer, name=name, **(hyperparams or {}))))
        sync = doc.sync or {}
        contributions = sync.get("contributions")
        # A round closing at a target weight takes any number of ranks.
        if world_size is not None and doc.mode == "sync" and not sync.get("target_weight") \
                and contributions != world_size:
            raise ValueError(f"session {doc.id} takes {contributions} contributions a round, "
                             f"the launch has {world_size} ranks")
        self.worker: SyncWorker | AsyncWorker
        if doc.mode == "sync":
            self.worker = SyncWorker(client, doc, weight=weight, rank=rank,
                                     round_retries=round_retries, as_="torch",
                                     grad_dtype=grad_dtype)
        else:
            self.worker = AsyncWorker(client, doc, on_stale=on_stale,
                                      max_recomputes=max_recomputes, rank=rank, as_="torch",
                                      grad_dtype=grad_dtype)
        if doc.tensors and set(doc.tensors) != set(self.tensors):
            raise ValueError(f"session {doc.id} holds {sorted(doc.tensors)}, the model "
                             f"{sorted(self.tensors)}")
        if pull:
            self._write(self.worker.pull())

    @property
    def version(self) -> int:
        """The session version the model's parameters are at."""
        return self.worker.version

    @property
    def last(self) -> StepReport | None:
        return self.worker.last

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.tensors.values():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def _grads(self) -> dict[str, Any]:
        out = {}
        for n, p in self.tensors.items():
            if p.grad is not None:
                out[n] = dense_grad(p.grad).detach()
        return out

    def _write(self, params: Mapping[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.tensors.items():
                if n in params:
                    p.copy_(params[n])

    def pull(self) -> None:
        """Overwrite the model's parameters with the session's current ones."""
        self._write(self.worker.pull())

    def step(self, closure: Callable[[], Any] | None = None, *,
             weight: float | None = None) -> Any:
        """Push the gradients (after running ``closure``, if given); update the model."""
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if isinstance(self.worker, SyncWorker):
            self._write(self.worker.step(self._grads(), weight=weight))
            return loss
        if self.worker.on_stale == "drop":
            self._write(self.worker.step(self._grads()))
            return loss
        if closure is None:
            raise TypeError("an async worker with on_stale='recompute' needs step(closure)")

        def recompute(params: Params) -> Grads:
            nonlocal loss
            self._write(params)
            with torch.enable_grad():
                loss = closure()
            return self._grads()

        self._write(self.worker.step(self._grads(), recompute))
        return loss
