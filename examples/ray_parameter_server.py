"""A Ray parameter server whose optimizer is optserve: Ray tasks compute gradients, an
optserve session holds the parameters and the RMSprop state.

    pip install "optserve[ray]"
    optserve serve &                  # or set OPTSERVE_URL to a running service
    python examples/ray_parameter_server.py [--mode actor|tasks|both] [--shards 4] [--steps 20]
                                            [--address auto]   # an existing Ray cluster

An `optserve_client.Client` pickles: it is passed to Ray tasks as an argument and held by
an actor; each copy keeps the configuration (URL, API key, timeouts, retries, headers,
format) and opens its own connections in its process. The problem is least squares on
synthetic data (a fixed seed) split into ``--shards`` shards; gradients are plain NumPy.

* ``--mode actor`` (default): per step, one Ray task per shard pulls the parameters with
  the Client it was given and returns its shard's gradient; the `ParameterServer` actor,
  which holds a Client, averages them in shard order and steps the session. One step after
  another, in a known order: the result is bitwise that of `torch.optim.RMSprop` fed the
  same means.
* ``--mode tasks``: a sync-mode session with ``contributions = shards``. Per step, every
  task pushes its shard's gradient itself (weighted by the shard's size); the service
  steps once on the weighted mean of the round. The tasks of a round wait for each other,
  so they must run at the same time: each asks for ``1/shards`` of the CPUs at most.

For each mode run, a line of JSON is printed last: the mode, the session, its version and
the final loss.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from optserve_client import Client

PARAMS = ("w", "b")


@dataclass(frozen=True)
class Problem:
    """Least squares ``y ~ x @ w + b``, float32, from a fixed seed."""

    x: np.ndarray
    y: np.ndarray
    shards: int

    @classmethod
    def make(cls, shards: int = 4, rows: int = 256, dim: int = 8, seed: int = 0) -> Problem:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        w = rng.standard_normal(dim, dtype=np.float32)
        y = x @ w + np.float32(0.5) + np.float32(0.1) * rng.standard_normal(rows, np.float32)
        return cls(x, y.astype(np.float32), shards)

    def initial(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(self.x.shape[1], np.float32), "b": np.zeros((), np.float32)}

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i::self.shards], self.y[i::self.shards]

    def gradient(self, params: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
        """The mean-squared-error gradient on shard ``i``. Elementwise products and NumPy
        sums (no BLAS): the same bits in every process, whatever its thread count."""
        x, y = self.shard(i)
        r = (x * params["w"]).sum(axis=1) + params["b"] - y
        scale = np.float32(2 / len(y))
        return {"w": (x * r[:, None]).sum(axis=0) * scale, "b": r.sum() * scale}

    def loss(self, params: dict[str, np.ndarray]) -> float:
        r = (self.x * params["w"]).sum(axis=1) + params["b"] - self.y
        return float((r * r).mean())


def mean_in_order(grads: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The plain mean, summed in the given (shard) order: a known order, known bits."""
    out = {}
    for name in PARAMS:
        acc = grads[0][name].copy()
        for g in grads[1:]:
            acc = acc + g[name]
        out[name] = acc / np.float32(len(grads))
    return out


@ray.remote
def shard_gradient(client: Client, session_id: str, problem: Problem, i: int,
                   version: int) -> dict[str, np.ndarray]:
    """Pull the parameters (with the Client passed in) and return shard ``i``'s gradient."""
    params, v = client.get_params(session_id)
    assert v == version, f"shard {i} read version {v}, expected {version}"
    return problem.gradient(params, i)


@ray.remote
def push_gradient(client: Client, session_id: str, problem: Problem, i: int,
                  version: int) -> int:
    """Pull the parameters, push shard ``i``'s gradient into the round of ``version``;
    returns once the round closed (the version it made)."""
    params, v = client.get_params(session_id)
    assert v == version, f"shard {i} read version {v}, expected {version}"
    weight = float(len(problem.shard(i)[1]))
    result = client.step(session_id, problem.gradient(params, i), weight=weight,
                         base_version=v, return_params=False)
    return result.version


@ray.remote
class ParameterServer:
    """Holds a Client and steps the session with the mean of each step's gradients."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.session_id = session_id

    def apply(self, *grads: dict[str, np.ndarray]) -> int:
        return self.client.step(self.session_id, mean_in_order(list(grads)),
                                return_params=False).version

    def params(self) -> dict[str, np.ndarray]:
        return self.client.get_params(self.session_id)[0]


def run(client: Client, problem: Problem, *, steps: int = 20, lr: float = 0.05,
        mode: str = "actor", log_every: int = 5) -> dict[str, Any]:
    """Train for ``steps`` steps; returns the session id, its version and the loss."""
    if mode == "actor":
        session = client.create_session("rmsprop", {"lr": lr}, problem.initial(),
                                        name="ray-actor")
        server = ParameterServer.remote(client, session.id)
        version = 0
        for step in range(steps):
            grads = [shard_gradient.remote(client, session.id, problem, i, version)
                     for i in range(problem.shards)]
            version = ray.get(server.apply.remote(*grads))  # Ray hands the actor the arrays
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}: loss {problem.loss(client.get_params(session.id)[0]):.5f}")
    elif mode == "tasks":
        session = client.create_session("rmsprop", {"lr": lr}, problem.initial(),
                                        mode="sync", name="ray-tasks",
                                        sync={"contributions": problem.shards, "timeout_s": 60})
        cpus = ray.cluster_resources().get("CPU", 1.0)
        push = push_gradient.options(num_cpus=min(1.0, cpus / problem.shards))
        for step in range(steps):
            versions = ray.get([push.remote(client, session.id, problem, i, step)
                                for i in range(problem.shards)])
            assert versions == [step + 1] * problem.shards, versions
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}: loss {problem.loss(client.get_params(session.id)[0]):.5f}")
    else:
        raise ValueError(f"unknown mode {mode!r}")
    params, version = client.get_params(session.id)
    return {"session": session.id, "version": version, "loss": problem.loss(params)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--mode", choices=("actor", "tasks", "both"), default="actor")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05, help="RMSprop lr (in the service)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--address", default=None, help="a Ray cluster (default: start one here)")
    ap.add_argument("--num-cpus", type=int, default=2, help="for the local Ray instance")
    ap.add_argument("--keep", action="store_true", help="leave the session on the server")
    args = ap.parse_args(argv)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    modes = ("actor", "tasks") if args.mode == "both" else (args.mode,)
    outs = []
    try:
        with Client(args.url) as client:
            for mode in modes:
                out = run(client, Problem.make(args.shards, seed=args.seed), steps=args.steps,
                          lr=args.lr, mode=mode)
                outs.append({"mode": mode, **out})
                if not args.keep:
                    client.delete_session(out["session"])
    finally:
        ray.shutdown()
    for out in outs:
        print(json.dumps(out))
    return outs


if __name__ == "__main__":
    main()
