"""What the optim tests share: option rows, seeded inputs, torch's run, ours, the comparison.

Every expected value comes from running the matching ``torch.optim`` class on the same
inputs (no hard-coded numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optserve import optim

STEPS = 100
SHAPES: dict[str, tuple[int, ...]] = {"w": (3, 5), "b": (7,)}
Grads = dict[str, Tensor | None]
State = dict[str, dict[str, Tensor]]
Run = tuple[dict[str, Tensor], State]

RMSPROP_ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr1e-3": {"lr": 1e-3},
    "wd": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "wd+centered": {"weight_decay": 0.1, "centered": True},
    "maximize+wd": {"maximize": True, "weight_decay": 0.1},
    "wd+centered+momentum": {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
    "wd+centered+momentum+maximize": {
        "weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True,
    },
    "alpha0.9+eps1e-2": {"alpha": 0.9, "eps": 1e-2},
    "alpha0.9+momentum0.9": {"alpha": 0.9, "momentum": 0.9},
}
ADAGRAD_ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr_decay": {"lr_decay": 0.01},
    "initial_accumulator_value": {"initial_accumulator_value": 0.1},
    "wd": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "all": {"lr": 0.05, "lr_decay": 0.001, "initial_accumulator_value": 0.5,
            "weight_decay": 0.1, "maximize": True, "eps": 1e-6},
}
SGD_ROWS: dict[str, dict[str, Any]] = {
    "default": {},
    "momentum": {"momentum": 0.9},
    "momentum+dampening": {"momentum": 0.9, "dampening": 0.5},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "wd": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "all": {"lr": 0.01, "momentum": 0.5, "nesterov": True, "weight_decay": 0.1,
            "maximize": True},
}
ROWS = {"rmsprop": RMSPROP_ROWS, "adagrad": ADAGRAD_ROWS, "sgd": SGD_ROWS}
ALL_ROWS = [(o, r) for o, rows in ROWS.items() for r in rows]

# Rows that switch every structural flag on at once (shared by several compiled tests).
ALL_FLAGS = {"rmsprop": RMSPROP_ROWS["wd+centered+momentum+maximize"],
             "adagrad": ADAGRAD_ROWS["all"], "sgd": SGD_ROWS["all"]}


def make_params(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
            for n, s in shapes.items()}


def make_grads(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, seed: int,
               steps: int = STEPS) -> list[Grads]:
    """Random signs times 10**uniform(-3, 2): magnitudes across five decades."""
    gen = torch.Generator().manual_seed(seed)
    seq: list[Grads] = []
    for _ in range(steps):
        grads: Grads = {}
        for n, s in shapes.items():
            sign = torch.randint(0, 2, s, generator=gen).to(torch.float64) * 2 - 1
            mag = 10.0 ** (torch.rand(s, generator=gen, dtype=torch.float64) * 5 - 3)
            grads[n] = (sign * mag).to(dtype)
        seq.append(grads)
    return seq


def run_torch(opt: optim.OptimizerDef, hp: dict[str, Any], init: Mapping[str, Tensor],
              grad_seq: list[Grads]) -> Run:
    """Run ``torch.optim.<X>`` with its defaults (for the tensors' device) over the grads."""
    names = list(init)
    ps = {n: torch.nn.Parameter(init[n].clone()) for n in names}
    topt = opt.torch_class([ps[n] for n in names], **hp)
    for grads in grad_seq:
        for n in names:
            g = grads.get(n)
            ps[n].grad = None if g is None else g.to(ps[n].dtype)
        topt.step()
    state = {n: dict(topt.state[ps[n]]) for n in names if len(topt.state[ps[n]])}
    return {n: p.detach() for n, p in ps.items()}, state


def run_ours(opt: optim.OptimizerDef, hp: dict[str, Any], init: Mapping[str, Tensor],
             grad_seq: list[Grads], *, kernel: optim.KernelName = "exact") -> Run:
    params = {n: t.clone() for n, t in init.items()}
    state: State = {}
    model = opt.hyperparams.model_validate(hp)
    for grads in grad_seq:
        optim.step(opt, params, grads, state, model, kernel=kernel)
    return params, state


def norm_rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    num = float(torch.linalg.vector_norm(a.double() - b.double()))
    den = float(torch.linalg.vector_norm(b.double()))
    return num / den if den else num


def assert_same(opt: optim.OptimizerDef, hp: dict[str, Any], ours: Run, theirs: Run,
                norm_rtol: float | None = None) -> None:
    """Params, every state tensor and ``step``: bitwise (``norm_rtol`` None), or each tensor
    within ``||ours - torch|| / ||torch|| <= norm_rtol`` (what the README claims for the
    compiled kernel). Step counts are exact either way."""
    (p1, s1), (p2, s2) = ours, theirs

    def check(a: Tensor, b: Tensor, what: str) -> None:
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, what
        if norm_rtol is None:
            assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max()}"
        else:
            assert torch.isfinite(a).all(), what
            err = norm_rel_err(a, b)
            assert err <= norm_rtol, f"{what}: ||ours - torch|| / ||torch|| = {err:.3g}"

    assert p1.keys() == p2.keys()
    for n in p1:
        check(p1[n], p2[n], f"param {n}")
    if opt.eager_state:  # torch made state for never-stepped params in __init__
        model = opt.hyperparams.model_validate(hp)
        s1 = {n: s1.get(n) or opt.init_state(p1[n], model) for n in p1}
    assert s1.keys() == s2.keys()
    for n in s1:
        assert s1[n].keys() == s2[n].keys(), n
        for k in s1[n]:
            if k == "step":  # counts are exact on every path
                assert s1[n][k].dtype == torch.float32 and s1[n][k].dim() == 0
                assert torch.equal(s1[n][k], s2[n][k]), f"{n}.step"
            else:
                check(s1[n][k], s2[n][k], f"state {n}.{k}")
