"""examples/ray_parameter_server.py with real Ray: the session's final parameters against
a local `torch.optim.RMSprop` fed the same gradients."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from optserve_client import Client

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS, SHARDS, LR = 6, 4, 0.05


def example() -> ModuleType:
    path = ROOT / "examples" / "ray_parameter_server.py"
    spec = importlib.util.spec_from_file_location("example_ray_parameter_server", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def run_example(url: str) -> dict[str, dict]:
    """The example as a user runs it (its own Ray instance, 2 CPUs), both modes, sessions
    kept: {mode: its JSON line}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "service"), str(ROOT / "clients"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ray_parameter_server.py"), "--url", url,
         "--mode", "both", "--steps", str(STEPS), "--shards", str(SHARDS), "--lr", str(LR),
         "--num-cpus", "2", "--keep"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {out["mode"]: out for out in outs}


def reference(mode: str) -> dict[str, np.ndarray]:
    """torch's RMSprop, stepped here on the gradients the example's tasks compute."""
    ex = example()
    problem = ex.Problem.make(SHARDS)
    params = {n: torch.nn.Parameter(torch.from_numpy(a)) for n, a in problem.initial().items()}
    opt = torch.optim.RMSprop(list(params.values()), lr=LR)
    for _ in range(STEPS):
        now = {n: p.detach().numpy() for n, p in params.items()}
        grads = [problem.gradient(now, i) for i in range(SHARDS)]
        if mode == "actor":
            mean = ex.mean_in_order(grads)
        else:  # the sync round's mean: weighted by shard size, summed in float64
            w = [len(problem.shard(i)[1]) for i in range(SHARDS)]
            mean = {n: (sum(wi * g[n].astype(np.float64) for wi, g in zip(w, grads, strict=True))
                        / sum(w)).astype(np.float32) for n in params}
        for n, p in params.items():
            p.grad = torch.from_numpy(np.array(mean[n]))
        opt.step()
    return {n: p.detach().numpy() for n, p in params.items()}


def test_ray_parameter_server_matches_torch(live_server: str) -> None:
    """One Ray start for both modes (starting Ray is most of the time)."""
    outs = run_example(live_server)
    assert set(outs) == {"actor", "tasks"}
    for mode, out in outs.items():
        with Client(live_server) as c:
            got, version = c.get_params(out["session"])
            c.delete_session(out["session"])
        assert out["version"] == version == STEPS
        want = reference(mode)
        for name, value in want.items():
            if mode == "actor":  # one step after another in a known order: the same bits
                np.testing.assert_array_equal(got[name], value)
            else:  # a round sums its contributions in no fixed order: equal within rounding
                np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)
