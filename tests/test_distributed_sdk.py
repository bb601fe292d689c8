"""The SDK's data-parallel helpers: sync workers are one optimizer on the averaged gradient;
async workers follow their staleness policy."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from optserve_client import Client
from optserve_client.distributed import (
    AsyncWorker,
    DataParallelOptimizer,
    StepReport,
    SyncWorker,
    create_async_session,
    create_sync_session,
)

ROOT = Path(__file__).resolve().parent.parent
HP = {"lr": 0.01, "momentum": 0.9}


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(x: torch.Tensor, rank: int, world: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s step-``step`` batch: ranks differ in batch size, so weights matter."""
    shard = torch.arange(rank, len(x), world)
    size = rank + 3
    return shard[torch.arange(step * size, (step + 1) * size) % len(shard)]


def reference(model: torch.nn.Module, grads_of: list, steps: int, **hp: float
              ) -> dict[str, torch.Tensor]:
    """torch.optim.RMSprop stepping on the example-weighted mean of the workers' gradients
    (summed in float64, as the service does)."""
    params = dict(model.named_parameters())
    opt = torch.optim.RMSprop(params.values(), **hp)
    for step in range(steps):
        acc: dict[str, torch.Tensor] = {}
        total = 0.0
        for grad_of in grads_of:
            weight, grads = grad_of(step)
            total += weight
            for n, g in grads.items():
                acc[n] = acc.get(n, 0) + g.double() * weight
        for n, p in params.items():
            p.grad = (acc[n] / total).float()
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_sync_workers_threads_match_local_reference(live_server: str, workers: int) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(48, 5), torch.randn(48, 1)
    steps = 4
    with Client(live_server) as client:
        sid = create_sync_session(client, tiny_model(), workers, timeout_s=30, **HP).id
        models = [tiny_model() for _ in range(workers)]
        for m in models:  # start elsewhere: the optimizer pulls the session's parameters
            torch.nn.init.zeros_(m[0].weight)
        finals: dict[int, dict[str, torch.Tensor]] = {}
        reports: dict[int, StepReport | None] = {}

        def work(rank: int) -> None:
            model = models[rank]
            opt = DataParallelOptimizer(model, client, sid, rank=rank)
            for step in range(steps):
                idx = batch(x, rank, workers, step)
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
                opt.step(weight=len(idx))
            finals[rank] = {n: p.detach().clone() for n, p in model.named_parameters()}
            reports[rank] = opt.last

        threads = [threading.Thread(target=work, args=(r,)) for r in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(finals) == workers
        assert client.get_session(sid).version == steps
        client.delete_session(sid)

    def grad_of(rank: int):
        def at(step: int) -> tuple[float, dict[str, torch.Tensor]]:
            idx = batch(x, rank, workers, step)
            ref_model.zero_grad()
            torch.nn.functional.mse_loss(ref_model(x[idx]), y[idx]).backward()
            return float(len(idx)), {n: p.grad.clone() for n, p in ref_model.named_parameters()}
        return at

    ref_model = tiny_model()
    ref = reference(ref_model, [grad_of(r) for r in range(workers)], steps, **HP)
    for rank in range(workers):
        assert reports[rank] == StepReport(steps - 1, steps, "applied", 1, 0)
        for n in ref:
            assert torch.equal(finals[rank][n], finals[0][n])  # one model, K copies
            torch.testing.assert_close(finals[rank][n], ref[n], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_data_parallel_example_processes_match_local_reference(live_server: str,
                                                               tmp_path: Path) -> None:
    """examples/data_parallel.py: 3 worker processes (spawned) train the digits MLP."""
    ex = load_example("data_parallel")
    workers, steps, bs = 3, 5, 32
    out = tmp_path / "final.safetensors"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "data_parallel.py"), "--url", live_server,
         "--workers", str(workers), "--steps", str(steps), "--batch-size", str(bs),
         "--save", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"final version {steps}," in proc.stdout
    from safetensors.torch import load_file

    final = load_file(out)

    ref = _example_reference(ex, workers, steps, bs)
    assert set(final) == set(ref)
    for n in ref:
        torch.testing.assert_close(final[n], ref[n], rtol=1e-5, atol=1e-7)


def test_sync_worker_late_and_failed_rounds(live_server: str) -> None:
    """A push for a round that closed without it gets the round's parameters ("late"); a
    round that failed is pushed again (the session is still at its version)."""
    with Client(live_server) as client:
        sid = create_sync_session(client, {"w": np.zeros(3, np.float32)}, 3,
                                  min_contributions=2, timeout_s=0.5, lr=0.1).id
        a, b, c = (SyncWorker(client, sid, rank=r) for r in range(3))
        out: dict[str, np.ndarray] = {}
        ta = threading.Thread(target=lambda: out.update(a=a.step({"w": np.ones(3)})))
        tb = threading.Thread(target=lambda: out.update(b=b.step({"w": np.ones(3)})))
        ta.start(), tb.start(), ta.join(30), tb.join(30)
        # c computed on version 0 too, but arrives after the deadline closed round 0
        params = c.step({"w": np.full(3, 100.0)})
        assert c.last == StepReport(0, 1, "late", 1)
        np.testing.assert_array_equal(params["w"], out["a"]["w"])
        assert a.last == b.last == StepReport(0, 1, "applied", 1)
        assert client.get_session(sid).version == 1

        # Round 1: a alone, below min_contributions: the round fails at its deadline and a
        # pushes again (it logs so); b joins the second try.
        failed = threading.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "failed; pushing again" in record.getMessage():
                    failed.set()

        watch = Watch(logging.INFO)
        logger = logging.getLogger("optserve_client")
        level = logger.level
        logger.addHandler(watch)
        logger.setLevel(logging.INFO)
        try:
            t0 = time.monotonic()
            ta = threading.Thread(target=lambda: out.update(a=a.step({"w": np.ones(3)})))
            ta.start()
            assert failed.wait(30)
            out["b"] = b.step({"w": np.ones(3)})
            ta.join(30)
        finally:
            logger.removeHandler(watch)
            logger.setLevel(level)
        assert time.monotonic() - t0 >= 0.5
        assert a.last == StepReport(1, 2, "applied", 2)
        assert b.last == StepReport(1, 2, "applied", 1)
        np.testing.assert_array_equal(out["a"]["w"], out["b"]["w"])
        client.delete_session(sid)


def quadratic(target: float):
    """Gradient of 0.5 * |w - target|^2 at the given params; records the params seen."""
    seen: list[np.ndarray] = []

    def fn(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(params["w"].copy())
        return {"w": params["w"] - np.float32(target)}

    fn.seen = seen  # type: ignore[attr-defined]
    return fn


def rmsprop_reference(w0: np.ndarray, targets_and_bases: list[tuple[float, np.ndarray]]
                      ) -> list[np.ndarray]:
    """Parameters after each async step: grad = w_base - target, applied to the current w."""
    w = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=0.1)
    out = []
    for target, base in targets_and_bases:
        w.grad = torch.from_numpy(base - np.float32(target))
        opt.step()
        out.append(w.detach().numpy().copy())
    return out


def test_async_stale_push_is_recomputed(live_server: str) -> None:
    """max_staleness=1: a's gradient of version 0 is refused at version 2; a pulls version 2,
    recomputes on it and pushes again (base 2 -> version 3). Then the torch wrapper does the
    same through its closure."""
    w0 = np.array([1.0, -2.0, 3.0], np.float32)
    with Client(live_server) as client:
        sid = create_async_session(client, {"w": w0}, max_staleness=1, lr=0.1).id
        a = AsyncWorker(client, sid, on_stale="recompute", rank=0)
        b = AsyncWorker(client, sid, on_stale="recompute", rank=1)
        fa, fb = quadratic(5.0), quadratic(-1.0)
        a.pull()
        assert a.version == 0
        b.step(fb)
        b.step(fb)
        assert b.version == 2 and b.last == StepReport(1, 2, "applied")
        params = a.step(fa)
        assert a.last == StepReport(2, 3, "applied", pushes=2, recomputes=1)
        assert [len(fa.seen), a.version, client.get_session(sid).version] == [2, 3, 3]
        np.testing.assert_array_equal(fa.seen[0], w0)  # first computed on version 0
        w1, w2, w3 = rmsprop_reference(w0, [(-1.0, w0), (-1.0, fb.seen[1]),
                                            (5.0, fa.seen[1])])
        np.testing.assert_array_equal(fb.seen[1], w1)
        np.testing.assert_array_equal(fa.seen[1], w2)  # recomputed on version 2
        np.testing.assert_allclose(params["w"], w3, rtol=1e-5)

        # Within the staleness bound nothing is recomputed: base 3, session at 4.
        b.pull()
        b.step(fb)
        a.step(fa)
        assert a.last == StepReport(3, 5, "applied")

        # The torch wrapper: the closure runs again on the pulled parameters.
        w = torch.nn.Parameter(torch.zeros(3))
        opt = DataParallelOptimizer({"w": w}, client, sid, rank=2)
        assert opt.version == 5
        calls: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            calls.append(w.detach().clone())
            opt.zero_grad()
            loss = 0.5 * ((w - 2.0) ** 2).sum()
            loss.backward()
            return loss

        b.pull()
        b.step(fb)
        b.step(fb)  # session at 7; the wrapper's gradient of version 5 is too stale
        opt.step(closure)
        assert opt.last == StepReport(7, 8, "applied", pushes=2, recomputes=1)
        assert len(calls) == 2 and torch.equal(calls[1], torch.tensor(b.params["w"]))
        now, version = client.get_params(sid, as_="torch")
        assert version == 8 and torch.equal(w.detach(), now["w"])
        client.delete_session(sid)


def test_async_stale_push_is_dropped(live_server: str) -> None:
    """The same refusal with on_stale="drop": nothing is pushed again; the worker holds the
    session's parameters of version 2 and its next push is computed on them."""
    w0 = np.array([1.0, -2.0, 3.0], np.float32)
    with Client(live_server) as client:
        sid = create_async_session(client, {"w": w0}, max_staleness=1, lr=0.1).id
        a = AsyncWorker(client, sid, on_stale="drop", rank=0)
        b = AsyncWorker(client, sid, on_stale="drop", rank=1)
        a.pull()
        b.pull()
        fa, fb = quadratic(5.0), quadratic(-1.0)
        b.step(fb(b.params))
        b.step(fb(b.params))
        stale = fa(a.params)  # computed on version 0
        params = a.step(stale)
        assert a.last == StepReport(0, 2, "dropped", pushes=1)
        now, version = client.get_params(sid)
        assert version == 2 and a.version == 2
        np.testing.assert_array_equal(params["w"], now["w"])
        a.step(fa(a.params))
        assert a.last == StepReport(2, 3, "applied")
        _, w2, w3 = rmsprop_reference(w0, [(-1.0, w0), (-1.0, fb.seen[1]), (5.0, fa.seen[1])])
        np.testing.assert_array_equal(fa.seen[1], w2)
        np.testing.assert_allclose(a.params["w"], w3, rtol=1e-5)

        # recompute with max_recomputes=0 falls back to dropping
        c = AsyncWorker(client, sid, on_stale="recompute", max_recomputes=0, rank=2)
        c.pull()
        b.pull()
        b.step(fb(b.params))
        b.step(fb(b.params))
        c.step(quadratic(0.0))
        assert c.last == StepReport(3, 5, "dropped", pushes=1)
        with pytest.raises(TypeError):
            c.step({"w": np.ones(3, np.float32)})  # recompute needs a callable
        client.delete_session(sid)


def test_helpers_import_without_torch() -> None:
    """Like the rest of the SDK, the helpers import (and run on NumPy) without torch."""
    script = (
        "import sys\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'fastapi', 'redis', 'uvicorn'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "from optserve_client import distributed, federated\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'redis')]\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_rank_and_world_size_come_from_the_launcher(live_server: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """RANK/WORLD_SIZE (torchrun's) fill what is not given; explicit arguments win. With a
    world size, a session *name* is a rendezvous: rank 0 creates, the others wait and
    attach; without one nothing is created."""
    from optserve_client.errors import SessionNotFoundError
    from optserve_client.rendezvous import launch_rank_world

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_rank_world() == (1, 2)
    assert launch_rank_world(0, 3) == (0, 3)
    name = f"rdzv-{time.monotonic_ns()}"
    monkeypatch.setenv("OPTSERVE_SESSION", name)
    with Client(live_server) as client:
        opts: dict[int, DataParallelOptimizer] = {}
        # rank 1 (from the environment) starts first and waits for rank 0's session
        t1 = threading.Thread(target=lambda: opts.update(
            {1: DataParallelOptimizer(tiny_model(), client, wait_s=30)}))
        t1.start()
        time.sleep(0.5)
        assert t1.is_alive()
        opts[0] = DataParallelOptimizer(tiny_model(), client, rank=0, hyperparams=HP)
        t1.join(30)
        assert opts[0].worker.session_id == opts[1].worker.session_id
        assert [opts[0].worker.rank, opts[1].worker.rank] == [0, 1]
        doc = client.get_session(opts[0].worker.session_id)
        assert (doc.name, doc.mode, doc.sync["contributions"]) == (name, "sync", 2)
        assert doc.hyperparams["momentum"] == HP["momentum"]
        with pytest.raises(ValueError, match="contributions"):
            DataParallelOptimizer(tiny_model(), client, world_size=3)
        monkeypatch.delenv("WORLD_SIZE")
        with pytest.raises(SessionNotFoundError):
            DataParallelOptimizer(tiny_model(), client, f"{name}-absent", rank=0)
        client.delete_session(doc.id)


@pytest.mark.slow
def test_torchrun_example_ranks_match_local_reference(live_server: str,
                                                      tmp_path: Path) -> None:
    """examples/torchrun_data_parallel.py under `python -m torch.distributed.run
    --nproc_per_node 2`: both ranks end with the same parameters, those of torch's RMSprop
    on the example-weighted mean gradient of the two ranks' batches."""
    ex = load_example("data_parallel")
    world, steps, bs = 2, 4, 32
    name = f"torchrun-test-{time.monotonic_ns()}"
    env = {**os.environ, "OPTSERVE_SESSION": name}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(world), str(ROOT / "examples" / "torchrun_data_parallel.py"), "--url",
         live_server, "--steps", str(steps), "--batch-size", str(bs), "--save-dir",
         str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"final version {steps}," in proc.stdout
    from safetensors import safe_open
    from safetensors.torch import load_file

    finals = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world)]
    with safe_open(tmp_path / "rank0.safetensors", "pt") as f:
        sid = f.metadata()["session"]

    ref = _example_reference(ex, world, steps, bs)
    with Client(live_server) as client:
        doc = client.get_session(sid)
        assert (doc.name, doc.version, doc.sync["contributions"]) == (name, steps, world)
        client.delete_session(sid)
    for n in ref:
        assert torch.equal(finals[0][n], finals[1][n])
        torch.testing.assert_close(finals[0][n], ref[n], rtol=1e-5, atol=1e-7)


def _example_reference(ex: Any, workers: int, steps: int, bs: int) -> dict[str, torch.Tensor]:
    """Local RMSprop on the examples' weighted-mean gradients of `workers` shards, computed
    single-threaded as the workers compute them (the same kernels, the same sums)."""
    data = ex.load_data(0)
    model = ex.make_model(0)

    def grad_of(rank: int):
        idx = ex.shard(len(data.x_train), rank, workers)
        xs, ys = data.x_train[idx], data.y_train[idx]

        def at(step: int) -> tuple[float, dict[str, torch.Tensor]]:
            b = ex.batch_indices(len(xs), step, bs, rank, 0)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[b]), ys[b]).backward()
            return float(len(b)), {n: p.grad.clone() for n, p in model.named_parameters()}
        return at

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference(model, [grad_of(r) for r in range(workers)], steps, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
