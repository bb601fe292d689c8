"""On a CUDA device the default (exact) path is torch.optim's own default there (foreach):
bitwise equal to ``torch.optim`` on the same GPU, every row, float32 and float64.

Skipped without a GPU; ``benchmarks/gpu_check.sh`` runs these with ``-m gpu``.
"""

from __future__ import annotations

import pytest
import torch
from optim_cases import ALL_ROWS, ROWS, assert_same, make_grads, make_params, run_ours, run_torch

from optserve import optim

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = {"w": (300, 301), "b": (7,), "s": ()}


def test_torch_cuda_default_is_foreach() -> None:
    from torch.optim.optimizer import _default_to_fused_or_foreach

    p = torch.zeros(3, device="cuda")
    assert _default_to_fused_or_foreach([p], False, use_fused=False) == (False, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "row"), ALL_ROWS, ids=[f"{o}-{r}" for o, r in ALL_ROWS])
def test_cuda_exact_bitwise(name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = optim.get_optimizer(name), ROWS[name][row]
    init = {n: t.cuda() for n, t in make_params(SHAPES, dtype, seed=41).items()}
    grads = [{n: g.cuda() for n, g in s.items() if g is not None}
             for s in make_grads(SHAPES, dtype, seed=42, steps=20)]
    grads[3]["b"] = None  # a missing gradient skips that tensor, as in torch
    ours = run_ours(opt, hp, init, grads)
    assert all(t.is_cuda for t in ours[0].values())
    assert_same(opt, hp, ours, run_torch(opt, hp, init, grads))


def test_cuda_track_update() -> None:
    opt = optim.get_optimizer("rmsprop")
    params = {"w": torch.ones(1000, device="cuda")}
    before = params["w"].clone()
    sq = optim.step(opt, params, {"w": torch.ones(1000, device="cuda")}, {},
                    opt.hyperparams(), track_update=True)
    want = float(torch.linalg.vector_norm(params["w"] - before, dtype=torch.float64) ** 2)
    assert sq["w"] == pytest.approx(want)
