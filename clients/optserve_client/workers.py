"""The data-parallel workers: K processes pushing gradients to one optserve session.

Each worker computes gradients on its own shard and pushes them; the service holds the one
optimizer state. Two ways to combine the workers:

* **sync** (`SyncWorker`): the session is in sync mode with ``contributions = K`` (or a
  ``target_weight``: rounds close when the pushes' weights add up to it, so workers may come
  and go between rounds). A push names the round by the version its gradients were computed
  on (``X-Optserve-Base-Version``) and carries a weight (e.g. the batch size), then waits
  until the round closes; every worker gets the same new parameters. K workers with batch
  B each are then exactly one optimizer stepping on the weighted-mean gradient of the K*B
  examples (the server sums in float64).
* **async** (`AsyncWorker`): the session is in async mode, every push is one step, and the
  session's ``max_staleness = s`` refuses a gradient computed more than ``s`` versions ago
  (``409 stale_gradient``). The worker then re-pulls and either recomputes the gradient on
  the fresh parameters (``on_stale="recompute"``) or drops it (``"drop"``).

The workers only use `Client`, so they run the same in threads, processes or on other
machines; `optserve_client.distributed.DataParallelOptimizer` wraps either for a torch model.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._base import round_read_timeout
from ._codec import ArrayKind, is_torch, params_of
from ._results import Session
from .client import Client
from .errors import RoundClosedError, RoundFailedError, StaleGradientError

__all__ = [
    "AsyncWorker",
    "StepReport",
    "SyncWorker",
    "create_async_session",
    "create_sync_session",
]

log = logging.getLogger("optserve_client")

Params = dict[str, Any]
Grads = Mapping[str, Any]
GradFn = Callable[[Params], Grads]
OnStale = Literal["recompute", "drop"]


@dataclass
class StepReport:
    """What the last `step` did.

    ``base_version``: the version the last pushed gradients were computed on (the round, in
    sync mode). ``version``: the version of the parameters the worker now holds.
    ``status``: "applied" (the push became part of a step), "late" (sync: the round closed
    without this contribution, at its deadline), "dropped" (async: stale and dropped).
    ``pushes``: step requests made (more than 1 after a recompute or a failed round).
    ``recomputes``: gradients recomputed after a 409 stale_gradient.
    """

    base_version: int
    version: int
    status: Literal["applied", "late", "dropped"]
    pushes: int = 1
    recomputes: int = 0


def create_sync_session(client: Client, params: Any, workers: int | None = None, *,
                        min_contributions: int | None = None, timeout_s: float = 60.0,
                        target_weight: float | None = None, min_weight: float | None = None,
                        optimizer: str = "rmsprop", name: str | None = None,
                        **hyperparams: Any) -> Session:
    """A sync-mode session for ``workers`` data-parallel workers, or for rounds that close
    when the pushes' weights add up to ``target_weight`` (a target batch size: any number
    of workers), or whichever of the two comes first.

    ``params``: the initial parameters (mapping, (name, tensor) pairs, or a torch module).
    ``min_contributions`` (default ``workers``) / ``min_weight`` (default ``target_weight``):
    what a round needs at its deadline, ``timeout_s`` after its first contribution; with
    less the round fails and is retried.
    """
    if workers is None and target_weight is None:
        raise ValueError("give workers, target_weight or both")
    sync: dict[str, Any] = {"timeout_s": float(timeout_s)}
    if workers is not None:
        sync |= {"contributions": int(workers),
                 "min_contributions": int(min_contributions or workers)}
    if target_weight is not None:
        sync["target_weight"] = float(target_weight)
        if min_weight is not None:
            sync["min_weight"] = float(min_weight)
    return client.create_session(optimizer, hyperparams, params_of(params), mode="sync",
                                 sync=sync, name=name)


def create_async_session(client: Client, params: Any, *, max_staleness: int | None,
                         optimizer: str = "rmsprop", name: str | None = None,
                         **hyperparams: Any) -> Session:
    """An async-mode session whose pushes may lag at most ``max_staleness`` versions."""
    return client.create_session(optimizer, hyperparams, params_of(params), mode="async",
                                 max_staleness=max_staleness, name=name)


class _Worker:
    """What both workers share: the session, the params they hold and their version."""

    mode: str

    def __init__(self, client: Client, session: str | Session, *, rank: int | None,
                 as_: ArrayKind | None, grad_dtype: str | None) -> None:
        doc = client.get_session(session)
        if doc.mode != self.mode:
            raise ValueError(f"session {doc.id} is in {doc.mode} mode; "
                             f"{type(self).__name__} needs {self.mode} mode")
        self.session = doc
        self.session_id = doc.id
        self.rank = rank
        self.as_ = as_
        self.grad_dtype = grad_dtype
        self.client = client
        #: the version of `params` (before `pull`: the session's version when attached, the
        #: right base if the local parameters are the session's initial ones)
        self.version: int = doc.version or 0
        self.params: Params | None = None
        self.last: StepReport | None = None
        self._tag = f"{self.mode}-{'r' if rank is None else rank}-{uuid.uuid4().hex[:12]}"
        self._n = 0
        self._kind: ArrayKind = "numpy"  # without as_: what the last gradients were

    def pull(self) -> Params:
        """Fetch the session's current parameters (and their version)."""
        params, version = self.client.get_params(self.session_id, as_=self.as_ or self._kind)
        self.params, self.version = params, version
        return params

    def _key(self) -> str:
        """One Idempotency-Key per logical push: HTTP retries of it count once."""
        self._n += 1
        return f"{self._tag}-v{self.version}-{self._n}"

    def _push(self, grads: Grads, weight: float | None) -> tuple[Params, int]:
        if any(is_torch(g) for g in grads.values()):
            self._kind = "torch"
        res = self.client.step(self.session_id, grads, base_version=self.version,
                               weight=weight, idempotency_key=self._key(),
                               grad_dtype=self.grad_dtype, as_=self.as_)
        if res.replayed or res.params is None:
            # A replay answers with the first outcome's version but the current parameters;
            # read both again so that they agree.
            return self.pull(), self.version
        self.params, self.version = res.params, res.version
        return res.params, res.version


class SyncWorker(_Worker):
    """One data-parallel worker of a sync-mode session.

    ``step(grads)`` pushes the gradients computed on the parameters of version
    ``self.version`` (that version names the round), weighted by ``weight`` (the batch's
    example count, say: the round then steps on the mean gradient over all examples), waits
    for the round and returns its parameters. If the round closed at its deadline without
    this push (``409 round_closed``), the worker pulls the new parameters and reports
    "late"; its gradients are not used. If the round failed (too few contributions,
    ``409 round_failed``) the session is still at the same version, so the same gradients
    are pushed again, up to ``round_retries`` times, before the error is raised.
    """

    mode = "sync"

    def __init__(self, client: Client, session: str | Session, *, weight: float | None = None,
                 rank: int | None = None, round_retries: int = 2,
                 as_: ArrayKind | None = None, grad_dtype: str | None = None) -> None:
        super().__init__(client, session, rank=rank, as_=as_, grad_dtype=grad_dtype)
        self.weight = weight
        self.round_retries = round_retries
        self.client = client.with_read_timeout(round_read_timeout(self.session.sync))

    def step(self, grads: Grads, *, weight: float | None = None) -> Params:
        """Contribute to the round of ``self.version``; the round's new parameters."""
        weight = self.weight if weight is None else weight
        base = self.version
        pushes = 0
        while True:
            pushes += 1
            try:
                params, version = self._push(grads, weight)
            except RoundClosedError as exc:
                log.info("worker %s: round %d closed without it (now %s); pulling",
                         self.rank, base, exc.current_version)
                params = self.pull()
                self.last = StepReport(base, self.version, "late", pushes)
                return params
            except RoundFailedError:
                if pushes > self.round_retries:
                    raise
                log.info("worker %s: round %d failed; pushing again", self.rank, base)
                continue
            self.last = StepReport(base, version, "applied", pushes)
            return params


class AsyncWorker(_Worker):
    """One worker of an async-mode session with a staleness policy.

    ``step(grads_or_fn)`` pushes gradients computed on ``self.version``. If the session
    refuses them as too stale (``409 stale_gradient``: more than ``max_staleness`` versions
    behind), the worker pulls the current parameters and then

    * ``on_stale="recompute"``: calls ``fn(params)`` for fresh gradients and pushes again;
      after ``max_recomputes`` refusals in a row (the other workers keep outrunning this
      one) the gradient is dropped, as with "drop", rather than failing the training.
      Needs a callable.
    * ``on_stale="drop"``: forgets the gradients and returns the pulled parameters.
    """

    mode = "async"

    def __init__(self, client: Client, session: str | Session, *,
                 on_stale: OnStale = "recompute", max_recomputes: int = 3,
                 rank: int | None = None, as_: ArrayKind | None = None,
                 grad_dtype: str | None = None) -> None:
        if on_stale not in ("recompute", "drop"):
            raise ValueError("on_stale must be 'recompute' or 'drop'")
        super().__init__(client, session, rank=rank, as_=as_, grad_dtype=grad_dtype)
        self.on_stale = on_stale
        self.max_recomputes = max_recomputes

    def step(self, grads: Grads | GradFn, recompute: GradFn | None = None) -> Params:
        """Push gradients; the parameters after the step (or after a drop).

        ``grads``: the gradients, computed on the parameters of ``self.version``, or
        ``fn(params) -> grads`` (called on the worker's parameters, pulled if it has none).
        ``recompute``: what gives fresh gradients after a stale refusal (default: ``grads``
        when it is callable).
        """
        if callable(grads):
            recompute = recompute or grads
            if self.params is None:
                self.pull()
            grads = grads(self.params)  # type: ignore[arg-type]
        if recompute is None and self.on_stale == "recompute":
            raise TypeError("on_stale='recompute' needs a callable params -> gradients")
        pushes = recomputes = 0
        while True:
            base = self.version
            pushes += 1
            try:
                params, version = self._push(grads, None)
            except StaleGradientError as exc:
                log.info("worker %s: gradient of version %d is stale (now %s)", self.rank,
                         base, exc.current_version)
                params = self.pull()
                if self.on_stale == "drop" or recomputes >= self.max_recomputes:
                    if self.on_stale != "drop":
                        log.warning("worker %s: still stale after %d recomputes; dropping "
                                    "the gradient", self.rank, recomputes)
                    self.last = StepReport(base, self.version, "dropped", pushes, recomputes)
                    return params
                recomputes += 1
                grads = recompute(params)  # type: ignore[misc]
                continue
            self.last = StepReport(base, version, "applied", pushes, recomputes)
            return params


