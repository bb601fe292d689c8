"""Federated learning on non-IID digits: 8 clients, FedAvg-style rounds, RMSprop on the server.

    optserve serve &                  # or set OPTSERVE_URL to a running service
    python examples/federated.py [--rounds 20] [--epochs 2] [--clients 8] [--alpha 0.5]
                                 [--fail 2:3] [--straggle 4:5]

scikit-learn's digits (bundled, no download) are split over the clients by a Dirichlet(alpha)
draw per class (Hsu et al. 2019; alpha 0.5: most clients see a few digits mostly). Every
round each client trains a copy of the round's model for ``--epochs`` epochs of plain SGD
on its own examples and pushes ``round_params - local_params`` weighted by its example
count; the service averages the round and takes one RMSprop step (FedAdam-like server
hyperparameters, `optserve_client.federated.SERVER_HYPERPARAMS`). The accuracy on a held-out
quarter is printed per round, and at the end next to a centralized run of the same model
with the same SGD for rounds * epochs epochs.

``--fail R:K`` makes client K raise during round R, ``--straggle R:K`` makes it miss round
R's deadline: the round still closes with the others (``--min-contributions``, default 6),
``--timeout`` seconds after its first contribution; the straggler's push gets
``409 round_closed`` and it is back for the next round. ``--server-optimizer sgd
--server-lr 1`` is plain FedAvg, for comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path, not run
from _preflight import require_modules, require_service

require_modules(__file__, "numpy", "torch", "sklearn", "optserve_client")

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from optserve_client import Client
from optserve_client.federated import (
    FederatedClient,
    FederatedServer,
    LocalUpdate,
    RoundSummary,
    local_sgd,
    run_rounds,
)

from _digits import Data, accuracy, load_data, make_model


def dirichlet_split(y: np.ndarray, n_clients: int, alpha: float, seed: int = 0,
                    min_size: int = 20) -> list[np.ndarray]:
    """Non-IID shards: each class spread over the clients by a Dirichlet(alpha) draw
    (redrawn until every client has at least ``min_size`` examples)."""
    rng = np.random.default_rng(seed)
    while True:
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts[:-1])):
                parts[k] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p)) for p in parts]


def centralized(data: Data, epochs: int, lr: float = 0.05, batch_size: int = 16,
                seed: int = 0) -> float:
    """The reference: one model, the same SGD, ``epochs`` over all the training data."""
    model = make_model(seed)
    train = local_sgd(model, data.x_train, data.y_train, epochs=epochs, lr=lr,
                      batch_size=batch_size, seed=seed)
    params = dict(model.named_parameters())
    train({n: p.detach().clone() for n, p in params.items()}, 0)
    return accuracy(model, data.x_test, data.y_test)


def failing(update: LocalUpdate, round_: int) -> LocalUpdate:
    """A client that crashes in round ``round_``."""

    def wrapped(params: dict[str, Any], version: int) -> dict[str, Any]:
        if version == round_:
            raise RuntimeError(f"simulated crash in round {version}")
        return update(params, version)

    return wrapped


def straggling(update: LocalUpdate, round_: int, server: FederatedServer,
               limit_s: float) -> LocalUpdate:
    """A client that, in round ``round_``, finishes only after the round has closed."""

    def wrapped(params: dict[str, Any], version: int) -> dict[str, Any]:
        out = update(params, version)
        if version == round_:
            deadline = time.monotonic() + limit_s
            while server.version <= version and time.monotonic() < deadline:
                time.sleep(0.05)
        return out

    return wrapped


@dataclass
class Result:
    accuracies: list[float] = field(default_factory=list)
    summaries: list[RoundSummary] = field(default_factory=list)
    client_sizes: list[int] = field(default_factory=list)
    session_id: str = ""


def run(url: str | None = None, *, rounds: int = 20, epochs: int = 2, n_clients: int = 8,
        alpha: float = 0.5, lr: float = 0.05, batch_size: int = 16, timeout_s: float = 5.0,
        min_contributions: int | None = None, fail: dict[int, int] | None = None,
        straggle: dict[int, int] | None = None, seed: int = 0,
        server_optimizer: str = "rmsprop", server_hyperparams: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = print, delete: bool = True) -> Result:
    """Run the federation; ``fail``/``straggle`` map a round to the client that misbehaves."""
    torch.set_num_threads(1)  # many small clients: threads per op would only contend
    data = load_data(seed)
    shards = dirichlet_split(data.y_train.numpy(), n_clients, alpha, seed)
    out = Result(client_sizes=[len(s) for s in shards])
    fail, straggle = fail or {}, straggle or {}
    global_model = make_model(seed)
    with Client(url) as client:
        server = FederatedServer.create(
            client, global_model, n_clients=n_clients, min_contributions=min_contributions,
            timeout_s=timeout_s, optimizer=server_optimizer, name="federated-digits",
            **(server_hyperparams or {}))
        out.session_id = server.session_id
        clients = []
        for k, idx in enumerate(shards):
            update = local_sgd(make_model(seed), data.x_train[idx], data.y_train[idx],
                               epochs=epochs, lr=lr, batch_size=batch_size, seed=seed + k)
            for r, who in fail.items():
                if who == k:
                    update = failing(update, r)
            for r, who in straggle.items():
                if who == k:
                    update = straggling(update, r, server, 3 * timeout_s + 10)
            clients.append(FederatedClient(client, server.session_id, update, len(idx),
                                           client_id=f"client{k}"))
        if log:
            log(f"session {server.session_id}: {n_clients} clients, examples per client "
                f"{out.client_sizes}, server {server.session.hyperparams}")

        def on_round(s: RoundSummary) -> None:
            params, _ = server.params(as_="torch")
            with torch.no_grad():
                for n, p in global_model.named_parameters():
                    p.copy_(params[n])
            acc = accuracy(global_model, data.x_test, data.y_test)
            out.accuracies.append(acc)
            out.summaries.append(s)
            if log:
                odd = ", ".join(f"{r.client_id} {r.status}" for r in s.results
                                if r.status != "applied")
                log(f"round {s.round:3d}  version {s.version:3d}  accuracy {acc:.3f}  "
                    f"{s.applied}/{n_clients} applied{'  (' + odd + ')' if odd else ''}  "
                    f"{s.seconds:.2f} s")

        try:
            run_rounds(server, clients, rounds, on_round=on_round)
        finally:
            if delete:
                server.delete()
    return out


def _pairs(values: list[str]) -> dict[int, int]:
    out = {}
    for v in values:
        r, _, k = v.partition(":")
        out[int(r)] = int(k)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    ap.add_argument("--lr", type=float, default=0.05, help="clients' local SGD lr")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=5.0, help="round deadline (s)")
    ap.add_argument("--min-contributions", type=int, default=None)
    ap.add_argument("--fail", action="append", default=[], metavar="ROUND:CLIENT")
    ap.add_argument("--straggle", action="append", default=[], metavar="ROUND:CLIENT")
    ap.add_argument("--server-optimizer", choices=("rmsprop", "adagrad", "sgd"),
                    default="rmsprop", help="sgd with --server-lr 1 is plain FedAvg")
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    require_service(__file__, args.url)
    logging.basicConfig(level=logging.WARNING, format="%(threadName)s %(message)s")
    t0 = time.monotonic()
    res = run(args.url, rounds=args.rounds, epochs=args.epochs, n_clients=args.clients,
              alpha=args.alpha, lr=args.lr, batch_size=args.batch_size,
              timeout_s=args.timeout, min_contributions=args.min_contributions,
              fail=_pairs(args.fail), straggle=_pairs(args.straggle), seed=args.seed,
              server_optimizer=args.server_optimizer,
              server_hyperparams=None if args.server_lr is None else {"lr": args.server_lr})
    budget = args.rounds * args.epochs
    central = centralized(load_data(args.seed), budget, args.lr, args.batch_size, args.seed)
    print(f"federated: {res.accuracies[-1]:.3f} after {args.rounds} rounds "
          f"({time.monotonic() - t0:.1f} s); centralized SGD, {budget} epochs: {central:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
