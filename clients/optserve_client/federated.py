"""Federated averaging with an adaptive server optimizer (FedAvg rounds, RMSprop on the server).

In the spirit of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021; FedAdam,
FedYogi): each round, every client starts from the round's parameters ``x``, trains
locally (plain SGD, ``E`` epochs), and sends the pseudo-gradient ``x - x_local`` weighted
by its example count. The service averages the pseudo-gradients of the round (a sync-mode
session, ``contributions = n_clients``) and takes one RMSprop step with them: FedAvg is
the special case SGD with lr 1; RMSprop scales each coordinate by the running RMS of the
pseudo-gradients, which is what makes FedAdam/FedYogi robust to non-IID clients.

A client that fails (its local training raises) or is too slow simply does not contribute:
the round closes at its deadline (``timeout_s`` after its first contribution) with the
contributions it has, provided there are at least ``min_contributions``; the slow client's
late push is answered ``409 round_closed`` and it joins the next round.

`FederatedServer` creates and reads the session; `FederatedClient` is one client (in a
thread, a process or on another machine); `run_rounds` drives clients in threads of one
process, round by round (simulation, tests, the example); `local_sgd` builds a torch local
trainer. torch is imported only by `local_sgd`.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from ._base import round_read_timeout
from ._codec import ArrayKind, params_of
from ._results import Session
from .client import Client
from .errors import RoundClosedError, RoundFailedError

__all__ = [
    "SERVER_HYPERPARAMS",
    "ClientResult",
    "FederatedClient",
    "FederatedServer",
    "LocalUpdate",
    "RoundSummary",
    "local_sgd",
    "run_rounds",
]

log = logging.getLogger("optserve_client")

Params = dict[str, Any]
# (round's params, round number) -> the locally trained params
LocalUpdate = Callable[[Params, int], Params]
Status = Literal["applied", "late", "failed", "error"]

#: The server optimizer's defaults, FedAdam's (Reddi et al.) in RMSprop's terms:
#: alpha = b2 = 0.99; eps = their adaptivity tau = 1e-3 (pseudo-gradients are small, and with
#: torch's 1e-8 a coordinate that barely moves would take full-size steps); momentum = b1 =
#: 0.9. RMSprop's buffer sums where Adam's first moment averages (no 1 - b1 factor), so
#: lr = 0.01 moves like FedAdam's server lr 0.1, inside the range they found to work.
SERVER_HYPERPARAMS: dict[str, Any] = {"lr": 0.01, "alpha": 0.99, "eps": 1e-3, "momentum": 0.9}


class FederatedServer:
    """The coordinator's side: one sync-mode session whose steps are server updates.

    Use `create` for a new federation or ``FederatedServer(client, session_id)`` to attach.
    """

    def __init__(self, client: Client, session: str | Session) -> None:
        self.client = client
        self.session = client.get_session(session)
        if self.session.mode != "sync":
            raise ValueError(f"session {self.session.id} is not in sync mode")
        self.session_id = self.session.id

    @classmethod
    def create(cls, client: Client, params: Any, *, n_clients: int,
               min_contributions: int | None = None, timeout_s: float = 60.0,
               optimizer: str = "rmsprop", name: str | None = None,
               **hyperparams: Any) -> FederatedServer:
        """A new federation over ``params`` (mapping, (name, tensor) pairs, torch module).

        A round closes when all ``n_clients`` contributed, or ``timeout_s`` after its first
        contribution with at least ``min_contributions`` (default: three quarters of the
        clients, rounded up); hyperparameters default to `SERVER_HYPERPARAMS` (for RMSprop).
        """
        if min_contributions is None:
            min_contributions = max(1, math.ceil(0.75 * n_clients))
        if optimizer == "rmsprop":
            hyperparams = {**SERVER_HYPERPARAMS, **hyperparams}
        sync = {"contributions": int(n_clients), "min_contributions": int(min_contributions),
                "timeout_s": float(timeout_s)}
        doc = client.create_session(optimizer, hyperparams, params_of(params), mode="sync",
                                    sync=sync, name=name)
        return cls(client, doc)

    @property
    def version(self) -> int:
        """The number of server updates applied so far (the next round's number)."""
        return self.client.get_session(self.session_id).version or 0

    def params(self, *, as_: ArrayKind = "numpy") -> tuple[Params, int]:
        """The current global parameters and their version."""
        return self.client.get_params(self.session_id, as_=as_)

    def delete(self) -> None:
        self.client.delete_session(self.session_id)


@dataclass
class ClientResult:
    """One client's round: ``base_version`` (the round it trained on), ``version`` (the
    session's after), ``status``: "applied" (part of the round's step), "late" (the round
    closed before its push arrived), "failed" (the round had too few contributions),
    "error" (local training or the push raised; ``error`` holds it)."""

    client_id: str
    base_version: int
    version: int
    status: Status
    n_examples: int
    seconds: float
    error: BaseException | None = field(default=None, repr=False)


class FederatedClient:
    """One federated client.

    ``local_update(round_params, round) -> local_params`` trains locally from a copy of the
    round's parameters (see `local_sgd`); ``n_examples`` weighs the pseudo-gradient in the
    round's mean. ``as_``: the array kind the update receives ("torch" or "numpy").
    """

    def __init__(self, client: Client, session: str | Session, local_update: LocalUpdate,
                 n_examples: int, *, client_id: str | None = None,
                 as_: ArrayKind = "torch") -> None:
        if n_examples <= 0:
            raise ValueError("n_examples must be positive")
        doc = client.get_session(session)
        if doc.mode != "sync":
            raise ValueError(f"session {doc.id} is not in sync mode")
        self.session_id = doc.id
        self.timeout_s = float((doc.sync or {}).get("timeout_s", 60.0))
        self.client = client.with_read_timeout(round_read_timeout(doc.sync))
        self.local_update = local_update
        self.n_examples = int(n_examples)
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.as_ = as_

    def run_round(self) -> ClientResult:
        """Pull the round's parameters, train, push ``round - local``; never raises for a
        failure of this client (the round goes on without it).

        The push's Idempotency-Key is fixed per client and round (``fed-<id>-v<round>``):
        a client that retries a round it may already have pushed to (a broken connection,
        a restart with the same ``client_id``) is counted once; after a failed round the
        server keeps no record, so the same key contributes afresh to the next try.
        """
        t0 = time.monotonic()
        base = -1
        try:
            params, base = self.client.get_params(self.session_id, as_=self.as_)
            local = self.local_update(_copy(params), base)
            delta = {n: params[n] - local[n] for n in params if n in local}
            res = self.client.step(self.session_id, delta, base_version=base,
                                   weight=float(self.n_examples), return_params=False,
                                   idempotency_key=f"fed-{self.client_id}-v{base}")
            status: Status = "applied"
            version = res.version
        except RoundClosedError as exc:
            status, version = "late", exc.current_version if exc.current_version is not None \
                else base + 1
        except RoundFailedError as exc:
            status, version = "failed", exc.current_version if exc.current_version is not None \
                else base
        except Exception as exc:  # the client's own failure: the round goes on without it
            log.warning("client %s failed in round %d: %r", self.client_id, base, exc)
            return ClientResult(self.client_id, base, base, "error", self.n_examples,
                                time.monotonic() - t0, exc)
        return ClientResult(self.client_id, base, version, status, self.n_examples,
                            time.monotonic() - t0)

    def run(self, rounds: int | None = None, *, until_version: int | None = None,
            max_attempts: int | None = None) -> list[ClientResult]:
        """Take part in rounds on its own (one thread or process per client) until the
        session reaches ``until_version`` (or ``rounds`` versions past the current one;
        clients of one federation should share ``until_version``).

        After an error the client tries again at once, so a client that recovers still
        joins the round if it is open (and is counted once, see `run_round`); consecutive
        errors back off (0.2 s doubling, at most 5 s). At most ``max_attempts`` round
        attempts (default ``3 * rounds``).
        """
        if (rounds is None) == (until_version is None):
            raise ValueError("give rounds or until_version")
        if until_version is None:
            until_version = (self.client.get_session(self.session_id).version or 0) + rounds
        attempts = max_attempts or 3 * max(1, rounds or until_version)
        out: list[ClientResult] = []
        errors = 0
        for _ in range(attempts):
            result = self.run_round()
            out.append(result)
            if result.version >= until_version:
                break
            errors = errors + 1 if result.status == "error" else 0
            if errors:
                time.sleep(min(5.0, 0.2 * 2 ** (errors - 1)))
        return out


@dataclass
class RoundSummary:
    """One round of `run_rounds`: the version before and after, and each client's result."""

    round: int
    base_version: int
    version: int
    results: list[ClientResult]
    seconds: float

    @property
    def applied(self) -> int:
        return sum(r.status == "applied" for r in self.results)

    @property
    def closed(self) -> bool:
        return self.version > self.base_version


def run_rounds(server: FederatedServer, clients: Sequence[FederatedClient], rounds: int, *,
               on_round: Callable[[RoundSummary], None] | None = None) -> list[RoundSummary]:
    """Run ``rounds`` rounds with all ``clients`` concurrently (threads), one round at a time.

    A sync push blocks until its round closes, so the clients must run concurrently; the
    round ends when every client has returned (the late ones after their ``round_closed``).
    ``on_round`` sees each round's summary (evaluate, log, stop by raising).
    """
    summaries = []
    with ThreadPoolExecutor(max_workers=len(clients), thread_name_prefix="fed") as pool:
        for r in range(rounds):
            t0 = time.monotonic()
            base = server.version
            results = list(pool.map(lambda c: c.run_round(), clients))
            version = max([base, *(x.version for x in results if x.status != "error")])
            summary = RoundSummary(r, base, version, results, time.monotonic() - t0)
            summaries.append(summary)
            if on_round is not None:
                on_round(summary)
    return summaries


def _copy(params: Mapping[str, Any]) -> Params:
    return {n: (v.clone() if hasattr(v, "clone") else v.copy()) for n, v in params.items()}


def local_sgd(model: Any, x: Any, y: Any, *, epochs: int = 1, lr: float = 0.05,
              batch_size: int = 32, loss_fn: Callable[[Any, Any], Any] | None = None,
              momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0) -> LocalUpdate:
    """A torch local trainer: ``epochs`` of minibatch SGD over ``(x, y)`` from the round's
    parameters. The model is this client's own (not shared between threads); batches are
    shuffled by a generator seeded with ``(seed, round)``, so a run is reproducible.
    ``loss_fn`` defaults to cross-entropy."""
    import torch

    if loss_fn is None:
        loss_fn = torch.nn.functional.cross_entropy
    tensors = dict(model.named_parameters())

    def update(round_params: Params, round: int) -> Params:
        with torch.no_grad():
            for n, p in tensors.items():
                p.copy_(round_params[n])
        opt = torch.optim.SGD(tensors.values(), lr=lr, momentum=momentum,
                              weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + round)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        return {n: p.detach().clone() for n, p in tensors.items()}

    return update
