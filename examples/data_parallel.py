"""Data-parallel training: K worker processes, one model, one RMSprop in the service.

    optserve serve &                  # or set OPTSERVE_URL to a running service
    python examples/data_parallel.py [--workers 4] [--steps 100] [--batch-size 32]
                                     [--mode sync|async] [--max-staleness 2]
                                     [--on-stale recompute|drop] [--save params.safetensors]

The digits training set is split over the workers; each worker process holds its own copy
of a small MLP, computes the gradient of one batch of its shard per step and hands it to
`optserve_client.distributed.DataParallelOptimizer`.

* ``--mode sync`` (default): a sync-mode session with ``contributions = K``. Every step is
  one round: each worker pushes its gradient weighted by its batch size, the service steps
  RMSprop once on the weighted mean (the gradient of the K batches as one batch) and every
  worker continues from the same new parameters.
* ``--mode async``: each push is a step of its own; a gradient more than
  ``--max-staleness`` versions old is refused, and the worker recomputes it on fresh
  parameters (``--on-stale recompute``) or drops it (``drop``).

At the end the parameters are pulled and the accuracy on a held-out quarter printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path, not run
from _preflight import require_modules, require_service

require_modules(__file__, "numpy", "torch", "sklearn", "optserve_client")

import argparse
import logging
import math
import multiprocessing as mp
import os
import queue
import time
from typing import Any

import torch

from optserve_client import Client
from optserve_client.distributed import (
    DataParallelOptimizer,
    create_async_session,
    create_sync_session,
)

from _digits import accuracy, load_data, make_model


def shard(n: int, rank: int, world: int) -> torch.Tensor:
    """Worker ``rank``'s examples: every ``world``-th one (shards differ in size by <= 1)."""
    return torch.arange(rank, n, world)


def batch_indices(shard_size: int, step: int, batch_size: int, rank: int,
                  seed: int = 0) -> torch.Tensor:
    """Positions within the shard of step ``step``'s batch: a fresh seeded permutation per
    epoch; an epoch's last batch may be smaller (its weight says so)."""
    per_epoch = math.ceil(shard_size / batch_size)
    epoch, b = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + epoch)
    return torch.randperm(shard_size, generator=gen)[b * batch_size:(b + 1) * batch_size]


def worker(rank: int, world: int, url: str, session_id: str, x: torch.Tensor, y: torch.Tensor,
           args: dict[str, Any], results: Any) -> None:
    """One worker process: ``steps`` steps over its shard (x, y)."""
    torch.set_num_threads(1)
    model = make_model(args["seed"])
    loss_fn = torch.nn.functional.cross_entropy
    statuses: dict[str, int] = {}
    with Client(url) as client:
        opt = DataParallelOptimizer(model, client, session_id, rank=rank,
                                    on_stale=args["on_stale"])
        for step in range(args["steps"]):
            idx = batch_indices(len(x), step, args["batch_size"], rank, args["seed"])

            def closure(idx: torch.Tensor = idx) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                return loss

            loss = opt.step(closure, weight=len(idx))
            if opt.last is not None:
                statuses[opt.last.status] = statuses.get(opt.last.status, 0) + 1
                if opt.last.recomputes:
                    statuses["recomputed"] = statuses.get("recomputed", 0) + opt.last.recomputes
            if rank == 0 and (step % args["log_every"] == 0 or step == args["steps"] - 1):
                print(f"step {step:4d}  version {opt.version:5d}  worker-0 loss "
                      f"{loss.item():.4f}", flush=True)
    results.put((rank, opt.version, statuses))


def run(url: str | None = None, *, workers: int = 4, steps: int = 100, batch_size: int = 32,
        lr: float = 3e-3, mode: str = "sync", max_staleness: int = 2,
        on_stale: str = "recompute", timeout_s: float = 60.0, seed: int = 0,
        log_every: int = 10, save: str | None = None, delete: bool = True
        ) -> dict[str, Any]:
    """Create the session, run the worker processes, evaluate; returns a summary."""
    data = load_data(seed)
    model = make_model(seed)
    ctx = mp.get_context("spawn")  # no fork: torch and connection pools do not like it
    results = ctx.Queue()
    t0 = time.monotonic()
    with Client(url) as client:
        if mode == "sync":
            session = create_sync_session(client, model, workers, timeout_s=timeout_s,
                                          lr=lr, name="data-parallel-digits")
        else:
            session = create_async_session(client, model, max_staleness=max_staleness,
                                           lr=lr, name="data-parallel-digits")
        print(f"session {session.id} ({mode}), {workers} workers, "
              f"{len(data.x_train)} training examples", flush=True)
        args = {"steps": steps, "batch_size": batch_size, "seed": seed,
                "on_stale": on_stale, "log_every": log_every}
        procs = []
        for rank in range(workers):
            idx = shard(len(data.x_train), rank, workers)
            p = ctx.Process(target=worker, args=(rank, workers, client.base_url, session.id,
                                                 data.x_train[idx], data.y_train[idx], args,
                                                 results))
            p.start()
            procs.append(p)
        per_worker: dict[int, dict[str, int]] = {}
        try:
            while len(per_worker) < workers:
                try:
                    rank, version, statuses = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"a worker exited with {dead[0]}") from None
                    continue
                per_worker[rank] = {"version": version, **statuses}
        finally:
            for p in procs:
                if p.exitcode is None and len(per_worker) < workers:
                    p.terminate()
                p.join()
        params, version = client.get_params(session.id, as_="torch")
        if save:
            from safetensors.torch import save_file

            save_file({n: t.contiguous() for n, t in params.items()}, save,
                      metadata={"version": str(version)})
        if delete:
            client.delete_session(session.id)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    acc = accuracy(model, data.x_test, data.y_test)
    return {"version": version, "accuracy": acc, "workers": per_worker,
            "seconds": time.monotonic() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100, help="steps per worker")
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    ap.add_argument("--lr", type=float, default=3e-3, help="RMSprop lr (in the service)")
    ap.add_argument("--mode", choices=("sync", "async"), default="sync")
    ap.add_argument("--max-staleness", type=int, default=2)
    ap.add_argument("--on-stale", choices=("recompute", "drop"), default="recompute")
    ap.add_argument("--timeout", type=float, default=60.0, help="sync round deadline (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save", default=None, help="write the final parameters (safetensors)")
    args = ap.parse_args(argv)
    require_service(__file__, args.url)
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(message)s")
    out = run(args.url, workers=args.workers, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, mode=args.mode, max_staleness=args.max_staleness,
              on_stale=args.on_stale, timeout_s=args.timeout, seed=args.seed,
              log_every=args.log_every, save=args.save)
    for rank, info in sorted(out["workers"].items()):
        print(f"worker {rank}: {info}")
    print(f"final version {out['version']}, test accuracy {out['accuracy']:.3f} "
          f"({out['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
