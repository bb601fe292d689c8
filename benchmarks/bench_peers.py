"""optserve against the parameter servers people would otherwise write, side by side.

    pip install -e ".[server,bench]"
    python benchmarks/bench_peers.py [--sizes 1e4 1e6 1e7] [--only inprocess optserve ray rpc]

One round trip = push a float32 gradient of N elements, the server applies
`torch.optim.RMSprop(lr=1e-3)`, the new parameters come back. Timed for:

- torch in-process: `RMSprop.step()` alone (the base of every ratio), and step + a copy of
  the parameters (what a server has to hand back);
- a Ray actor parameter server as Ray's parameter-server example writes it: an actor that
  holds the model and its optimizer, `ray.get(ps.apply_gradients.remote(grad))`, gradients
  in and weights out as NumPy arrays;
- a torch.distributed.rpc (TensorPipe) parameter server as PyTorch's batch-updating
  parameter-server tutorial writes it: an RRef to the server, a static
  `@rpc.functions.async_execution` method that steps and completes a future with the
  parameters, the trainer in a second process calling it with `rpc_sync`;
- optserve: `optserve serve` with its Redis configured as deploy/ does (append-only,
  fsync every second), one keep-alive `http.client` connection, safetensors both ways,
  parameters returned, the default (exact) kernel.

Everything runs on loopback, on this machine, one after the other; prints one Markdown
table of median milliseconds and the ratio to the in-process step.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import cpu_model, loadavg, optserve_server
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

LR = 1e-3
# (warm-up calls, timed calls) per size; every warm-up also lasts at least WARM_S seconds:
# first touch of fresh memory (Ray's object store, Redis) is slow on a VM.
REPS = {10_000: (20, 100), 1_000_000: (5, 30), 10_000_000: (2, 8)}
WARM_S = 1.0


def reps(n: int) -> tuple[int, int]:
    return REPS.get(n, (2, 8) if n > 1_000_000 else (5, 30))


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Per-call seconds of ``fn`` after a warm-up of at least WARM_S."""
    warm, count = reps(n)
    end = time.perf_counter() + WARM_S
    k = 0
    while k < warm or time.perf_counter() < end:
        fn()
        k += 1
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- torch in-process ----------------------------------------------------------------------


def bench_inprocess(sizes: list[int]) -> dict[str, dict[int, list[float]]]:
    rows: dict[str, dict[int, list[float]]] = {"torch step": {}, "torch step + copy": {}}
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n))
        opt = torch.optim.RMSprop([p], lr=LR)
        p.grad = torch.randn(n)
        rows["torch step"][n] = timed(opt.step, n)

        def step_copy(opt: torch.optim.Optimizer = opt, p: torch.Tensor = p) -> torch.Tensor:
            opt.step()
            return p.detach().clone()

        rows["torch step + copy"][n] = timed(step_copy, n)
    return rows


# -- optserve ------------------------------------------------------------------------------


def bench_optserve(sizes: list[int]) -> tuple[dict[str, dict[int, list[float]]], str]:
    times: dict[int, list[float]] = {}
    with optserve_server(persistence="aof-everysec") as server:
        described = server.describe()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)

        def call(method: str, path: str, body: bytes, ctype: str) -> bytes:
            conn.request(method, path, body=body,
                         headers={"content-type": ctype, "accept": ctype})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status in (200, 201), (resp.status, data[:300])
            return data

        st = "application/octet-stream"
        for n in sizes:
            body = json.dumps({"optimizer": "rmsprop", "hyperparams": {"lr": LR}}).encode()
            sid = json.loads(call("POST", "/v1/sessions", body, "application/json"))["id"]
            call("PUT", f"/v1/sessions/{sid}/params", st_save({"w": torch.randn(n)}), st)
            grad = st_save({"w": torch.randn(n)})

            def step(sid: str = sid, grad: bytes = grad) -> torch.Tensor:
                return st_load(call("POST", f"/v1/sessions/{sid}/step", grad, st))["w"]

            times[n] = timed(step, n)
            conn.request("DELETE", f"/v1/sessions/{sid}")
            conn.getresponse().read()
        conn.close()
    return {"optserve (AOF everysec)": times}, described


# -- Ray -----------------------------------------------------------------------------------


def bench_ray(sizes: list[int]) -> dict[str, dict[int, list[float]]]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # stay on 127.0.0.1
    import ray

    @ray.remote
    class ParameterServer:
        def __init__(self, n: int) -> None:
            self.w = torch.nn.Parameter(torch.randn(n))
            self.optimizer = torch.optim.RMSprop([self.w], lr=LR)

        def apply_gradients(self, *gradients: np.ndarray) -> np.ndarray:
            summed = np.stack(gradients).sum(axis=0) if len(gradients) > 1 else gradients[0]
            self.optimizer.zero_grad()
            self.w.grad = torch.from_numpy(summed)
            self.optimizer.step()
            return self.get_weights()

        def get_weights(self) -> np.ndarray:
            return self.w.detach().numpy()

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="error")
    times: dict[int, list[float]] = {}
    try:
        for n in sizes:
            ps = ParameterServer.remote(n)
            grad = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            times[n] = timed(lambda ps=ps, grad=grad: ray.get(ps.apply_gradients.remote(grad)),
                             n)
            ray.kill(ps)
    finally:
        ray.shutdown()
    return {f"Ray {ray.__version__} actor": times}


# -- torch.distributed.rpc -----------------------------------------------------------------


class RpcParameterServer:
    """The tutorial's BatchUpdateParameterServer, one trainer per batch, one tensor."""

    def __init__(self, n: int, batch_update_size: int = 1) -> None:
        self.w = torch.nn.Parameter(torch.randn(n))
        self.optimizer = torch.optim.RMSprop([self.w], lr=LR)
        self.lock = threading.Lock()
        self.future_model: torch.futures.Future = torch.futures.Future()
        self.batch_update_size = batch_update_size
        self.curr_update_size = 0
        self.w.grad = torch.zeros(n)

    def get_model(self) -> torch.Tensor:
        return self.w.detach().clone()

    @staticmethod
    @torch.distributed.rpc.functions.async_execution
    def update_and_fetch_model(ps_rref, grad: torch.Tensor) -> torch.futures.Future:
        self = ps_rref.local_value()
        with self.lock:
            self.curr_update_size += 1
            self.w.grad += grad
            fut = self.future_model
            if self.curr_update_size >= self.batch_update_size:
                self.w.grad /= self.batch_update_size
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
                self.curr_update_size = 0
                fut.set_result(self.get_model())
                self.future_model = torch.futures.Future()
        return fut


def _rpc_worker(rank: int, port: int, sizes: list[int], queue) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from torch.distributed import rpc

    warnings.filterwarnings("ignore", category=UserWarning)  # Gloo's deprecation notice
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}",
                                           rpc_timeout=600)
    rpc.init_rpc("ps" if rank == 0 else "trainer", rank=rank, world_size=2,
                 rpc_backend_options=opts)
    if rank == 1:
        times: dict[int, list[float]] = {}
        for n in sizes:
            ps_rref = rpc.remote("ps", RpcParameterServer, args=(n,))
            grad = torch.randn(n)
            times[n] = timed(lambda r=ps_rref, g=grad: rpc.rpc_sync(
                r.owner(), RpcParameterServer.update_and_fetch_model, args=(r, g)), n)
            del ps_rref
        queue.put(times)
    rpc.shutdown()


def bench_rpc(sizes: list[int]) -> dict[str, dict[int, list[float]]]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rpc_worker, args=(r, port, sizes, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=600)
    if queue.empty():
        raise RuntimeError(f"torch RPC benchmark failed: exit codes "
                           f"{[p.exitcode for p in procs]}")
    return {"torch RPC (TensorPipe)": queue.get()}


# -- the table -----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e6, 1e7])
    ap.add_argument("--only", nargs="+", default=["inprocess", "optserve", "ray", "rpc"],
                    choices=["inprocess", "optserve", "ray", "rpc"])
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes]
    start, load_before = time.perf_counter(), loadavg()
    rows: dict[str, dict[int, list[float]]] = bench_inprocess(sizes)
    described = "not run"
    if "optserve" in args.only:
        found, described = bench_optserve(sizes)
        rows.update(found)
    if "rpc" in args.only:
        rows.update(bench_rpc(sizes))
    if "ray" in args.only:
        rows.update(bench_ray(sizes))
    base = {n: statistics.median(rows["torch step"][n]) for n in sizes}
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; Python {sys.version.split()[0]}, "
          f"torch {torch.__version__}; load average before {load_before}, after {loadavg()}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"optserve: {described}; kernel exact\n")
    head = " | ".join(f"N={n:.0e} median ms (x step)" for n in sizes)
    print(f"| system | {head} |")
    print("|---|" + "---:|" * len(sizes))
    for name, per_size in rows.items():
        cells = []
        for n in sizes:
            med = statistics.median(per_size[n])
            cells.append(f"{med * 1e3:.3g} ({med / base[n]:.1f}x)")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
