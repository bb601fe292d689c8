"""The step's update norm (the stats' "last update norm"), summed in the tensor's dtype
(float64 where that overflows), against torch's own float64 norm of the difference."""

from __future__ import annotations

import math

import pytest
import torch

from optserve import optim

_BLOCK = 1 << 18


@pytest.mark.parametrize("n", [7, _BLOCK, 2 * _BLOCK + 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_norm_matches_a_float64_norm_of_the_difference(n: int, dtype: torch.dtype
                                                               ) -> None:
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen, dtype=dtype)
    before = p.clone()
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({"lr": 1e-2, "momentum": 0.9, "centered": True})
    state: dict = {}
    for _ in range(3):
        before = p.clone()
        sq = optim.step(opt, {"w": p}, {"w": torch.randn(n, generator=gen, dtype=dtype)},
                        state, hp, track_update=True)["w"]
    want = float(torch.linalg.vector_norm(p - before, dtype=torch.float64)) ** 2
    assert want > 0
    assert math.isclose(sq, want, rel_tol=1e-5)


def test_a_block_whose_float32_sum_overflows_is_summed_in_float64() -> None:
    """Differences of 1e20 overflow a float32 sum of squares; the norm stays finite."""
    n = _BLOCK + 5
    p = torch.zeros(n)
    opt = optim.get_optimizer("sgd")
    hp = opt.hyperparams.model_validate({"lr": 1.0})
    sq = optim.step(opt, {"w": p}, {"w": torch.full((n,), -1e20)}, {}, hp,
                    track_update=True)["w"]
    want = n * 1e40
    assert math.isfinite(sq) and math.isclose(sq, want, rel_tol=1e-5)
