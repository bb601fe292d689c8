"""A Flower app whose server optimizer is optserve: softmax regression on scikit-learn's digits.

    python examples/flower_digits.py --url http://127.0.0.1:8000 --session digits-run
    python examples/flower_digits.py --url ... --strategy fedavg      # Flower's FedAvg

Four simulated clients hold non-IID shards (sorted by label: about two digits each); each
trains locally with plain SGD (NumPy) and the server steps the global model with the
strategy. The one line that differs from a FedAvg/FedAdam app is the strategy's.
Run it again with the same ``--session`` and it continues the run (Flower's simulation
runtime needs ``flwr[simulation]``, i.e. Ray).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

N_CLIENTS = 4
LOCAL = {"epochs": 2, "lr": 0.1, "batch": 32}


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int = 0) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return Data(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64))


def partition(y: np.ndarray, pid: int, n: int) -> np.ndarray:
    """Client ``pid``'s indices: two of ``2n`` label-sorted shards (non-IID)."""
    shards = np.array_split(np.argsort(y, kind="stable"), 2 * n)
    return np.concatenate([shards[pid], shards[pid + n]])


def initial_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": (0.01 * rng.standard_normal((64, 10))).astype(np.float32),
            "b": np.zeros(10, np.float32)}


def logits(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return x @ p["w"] + p["b"]


def accuracy(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(p, x).argmax(1) == y).mean())


def local_train(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, seed: int,
                epochs: int = LOCAL["epochs"], lr: float = LOCAL["lr"],
                batch: int = LOCAL["batch"]) -> dict[str, np.ndarray]:
    """Minibatch SGD on the cross-entropy, from a copy of ``p`` (deterministic per seed)."""
    w, b = p["w"].copy(), p["b"].copy()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            z = x[idx] @ w + b
            z = np.exp(z - z.max(1, keepdims=True))
            g = z / z.sum(1, keepdims=True)
            g[np.arange(len(idx)), y[idx]] -= 1.0
            g /= len(idx)
            w -= (lr * (x[idx].T @ g)).astype(np.float32)
            b -= (lr * g.sum(0)).astype(np.float32)
    return {"w": w, "b": b}


def to_record(p: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in p.items()})


def from_record(r: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in r.items()}


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    n = int(context.node_config["num-partitions"])
    data = load_data()
    idx = partition(data.y_train, pid, n)
    rnd = int(msg.content["config"]["server-round"])
    new = local_train(from_record(msg.content["arrays"]), data.x_train[idx],
                      data.y_train[idx], seed=1000 * rnd + pid)
    metrics = MetricRecord({"num-examples": len(idx)})
    return Message(content=RecordDict({"arrays": to_record(new), "metrics": metrics}),
                   reply_to=msg)


def evaluate_fn(data: Data, history: list[float]) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Centralized evaluation on the held-out test set (appends to ``history``)."""
    def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc = accuracy(from_record(arrays), data.x_test, data.y_test)
        history.append(acc)
        return MetricRecord({"accuracy": acc})
    return fn


def fit(strategy: Strategy, grid: Grid, rounds: int, history: list[float]) -> ArrayRecord:
    """Run ``rounds`` rounds of ``strategy`` from the initial model; the final arrays."""
    result = strategy.start(grid=grid, initial_arrays=to_record(initial_arrays()),
                            num_rounds=rounds, evaluate_fn=evaluate_fn(load_data(), history))
    return result.arrays


def nodes(n: int = N_CLIENTS) -> dict[str, object]:
    """Every client trains each round; no client-side evaluation (the server evaluates)."""
    return {"fraction_evaluate": 0.0, "min_train_nodes": n, "min_available_nodes": n}


def main() -> None:
    from flwr.simulation import run_simulation

    from optserve_client.flower import OptservRMSprop

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--session", default=None, help="name that makes the run resumable")
    ap.add_argument("--strategy", choices=["rmsprop", "fedavg"], default="rmsprop")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    history: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        if args.strategy == "fedavg":
            strategy: Strategy = FedAvg(**nodes())  # type: ignore[arg-type]
        else:
            strategy = OptservRMSprop(url=args.url, session=args.session, **nodes())
        fit(strategy, grid, args.rounds, history)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=N_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1}})
    print("test accuracy per round:", " ".join(f"{a:.3f}" for a in history))


if __name__ == "__main__":
    main()
