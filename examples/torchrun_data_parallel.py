"""Data-parallel training launched by torchrun: one process per rank, one RMSprop in the service.

    optserve serve &
    torchrun --nproc_per_node 2 examples/torchrun_data_parallel.py --url http://127.0.0.1:8000
    OPTSERVE_SESSION=my-run torchrun --nproc_per_node 2 examples/torchrun_data_parallel.py

Each rank reads its rank and the world size from torchrun's ``RANK``/``WORLD_SIZE``
(`DataParallelOptimizer` does it), trains the digits MLP of ``examples/data_parallel.py``
on its shard and pushes its gradients to one sync-mode session: every step is one RMSprop
step on the example-weighted mean gradient of all ranks, and all ranks hold the same
parameters after it. The session is found by name (``--session`` or
``$OPTSERVE_SESSION``): rank 0 creates it, the others attach; launched again with the same
name, the run continues. With no name, rank 0 draws a fresh one and shares it over the
process group torchrun set up.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel import batch_indices, load_data, make_model, shard

from optserve_client import Client
from optserve_client.distributed import DataParallelOptimizer
from optserve_client.rendezvous import SESSION_ENV, launch_rank_world


def fresh_name() -> str:
    """A new session name, drawn by rank 0 and broadcast over torchrun's process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        box = [f"torchrun-{uuid.uuid4().hex[:12]}" if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
    finally:
        dist.destroy_process_group()
    return str(box[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--session", default=os.environ.get(SESSION_ENV))
    ap.add_argument("--steps", type=int, default=100, help="steps per rank")
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=3e-3, help="RMSprop lr (in the service)")
    ap.add_argument("--timeout", type=float, default=60.0, help="sync round deadline (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="write rank<r>.safetensors there")
    args = ap.parse_args(argv)
    rank, world = launch_rank_world()
    if rank is None or world is None:
        ap.error("launch me with torchrun (RANK and WORLD_SIZE are not set)")
    torch.set_num_threads(1)
    name = args.session or fresh_name()
    data = load_data(args.seed)
    model = make_model(args.seed)
    idx = shard(len(data.x_train), rank, world)
    x, y = data.x_train[idx], data.y_train[idx]
    with Client(args.url) as client:
        opt = DataParallelOptimizer(model, client, name, hyperparams={"lr": args.lr},
                                    round_timeout_s=args.timeout)
        for step in range(args.steps):
            b = batch_indices(len(x), step, args.batch_size, rank, args.seed)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step(weight=len(b))
            if rank == 0 and step % 10 == 0:
                print(f"step {step:4d}  version {opt.version:5d}  loss {loss.item():.4f}",
                      flush=True)
    if args.save_dir:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  str(Path(args.save_dir) / f"rank{rank}.safetensors"),
                  metadata={"version": str(opt.version), "session": opt.worker.session_id})
    if rank == 0:
        with torch.no_grad():
            acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        print(f"session {name} ({opt.worker.session_id}): final version {opt.version}, "
              f"test accuracy {acc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
