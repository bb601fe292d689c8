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


@pytest.mark.parametrize(("name", "hp"), [("rmsprop", {"momentum": 0.9, "centered": True}),
                                         ("rmsprop", {"weight_decay": 0.1, "maximize": True}),
                                         ("adagrad", {"lr_decay": 0.01})])
def test_native_kernel_sums_in_its_own_pass(name: str, hp: dict) -> None:
    """Where the native kernel runs, it reports the gradient's and update's sums of squares
    and the accumulator's sum (no copy of the parameters taken), equal to torch's float64
    sums of the same tensors; the first step (no state yet) measures the usual way."""
    from optserve.optim import native

    assert native.wait(300), native.status
    n = 3 * 8192 + 11
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=gen)
    opt = optim.get_optimizer(name)
    model = opt.hyperparams.model_validate(hp)
    state: dict = {}
    for i in range(3):
        g = torch.randn(n, generator=gen)
        before = p.clone()
        totals: dict = {}
        sq = optim.step(opt, {"w": p}, {"w": g}, state, model, track_update=True,
                        totals=totals)["w"]
        want = float(torch.linalg.vector_norm(p - before, dtype=torch.float64)) ** 2
        if i == 0:  # a float32 sum of the difference (see above)
            assert totals == {} and math.isclose(sq, want, rel_tol=1e-4)
            continue
        assert math.isclose(sq, want, rel_tol=1e-9)  # the kernel sums in double
        t = totals["w"]
        assert t.update_sq == sq
        assert math.isclose(t.grad_sq, float((g.double() ** 2).sum()), rel_tol=1e-12)
        acc = state["w"]["square_avg" if name == "rmsprop" else "sum"]
        assert math.isclose(t.acc_sum, float(acc.double().sum()), rel_tol=1e-12)
