"""optserve.optim's default (exact) path against torch.optim itself: bitwise, every row.

Every expected value comes from running the matching ``torch.optim`` class on the same
inputs (no hard-coded numbers), compared with ``torch.equal`` (``rtol = atol = 0``). Small
tensors run 100 steps; tensors above 65,536 elements and around the exact path's block size
(odd sizes, block + 1, ...) run a few steps, so the whole file stays within seconds.
The compiled kernel has its own file (``test_optim_compiled.py``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch
from optim_cases import (
    ALL_FLAGS,
    ALL_ROWS,
    ROWS,
    SHAPES,
    Grads,
    assert_same,
    make_grads,
    make_params,
    run_ours,
    run_torch,
)
from torch import Tensor

from optserve import optim
from optserve.optim import exact


def _opt(name: str) -> optim.OptimizerDef:
    return optim.get_optimizer(name)


# --------------------------------------------------------------------------------------
# exact path: bitwise


def test_torch_cpu_default_is_single_tensor() -> None:
    """What torch.optim runs on CPU by default: neither foreach nor fused."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    assert _default_to_fused_or_foreach([torch.zeros(3)], False, use_fused=False) == (
        False, False)
    assert torch.optim.RMSprop([torch.zeros(3)]).param_groups[0]["foreach"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "row"), ALL_ROWS, ids=[f"{o}-{r}" for o, r in ALL_ROWS])
def test_plain_bitwise(name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = _opt(name), ROWS[name][row]
    init = make_params(SHAPES, dtype, seed=1)
    grads = make_grads(SHAPES, dtype, seed=2)
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


@pytest.mark.parametrize("name", list(ROWS))
def test_missing_gradients(name: str) -> None:
    """None and absent gradients skip the param: no state change, no step counted."""
    opt = _opt(name)
    hp = {"rmsprop": {"momentum": 0.5, "centered": True}, "adagrad": {"lr_decay": 0.1},
          "sgd": {"momentum": 0.9}}[name]
    shapes = {**SHAPES, "never": (2,)}
    init = make_params(shapes, torch.float32, seed=3)
    grads = make_grads(shapes, torch.float32, seed=4, steps=30)
    for i, g in enumerate(grads):
        g["never"] = None
        if i % 3 == 0:
            g["w"] = None
        if i % 4 == 1:
            del g["b"]
    ours = run_ours(opt, hp, init, grads)
    assert "never" not in ours[1]
    assert torch.equal(ours[0]["never"], init["never"])
    assert_same(opt, hp, ours, run_torch(opt, hp, init, grads))
    if name != "sgd":
        assert ours[1]["w"]["step"].item() == 20 and ours[1]["b"]["step"].item() == 22


@pytest.mark.parametrize("name", list(ROWS))
def test_zero_dim_and_empty(name: str) -> None:
    opt = _opt(name)
    hp = {"rmsprop": {"momentum": 0.9, "centered": True}, "adagrad": {"weight_decay": 0.1},
          "sgd": {"momentum": 0.9, "nesterov": True}}[name]
    shapes: dict[str, tuple[int, ...]] = {"s": (), "one": (1,), "e": (0,), "e2": (0, 3)}
    init = make_params(shapes, torch.float32, seed=5)
    grads = make_grads(shapes, torch.float32, seed=6, steps=10)
    assert_same(opt, hp, run_ours(opt, hp, init, grads),
                run_torch(opt, hp, init, grads))


@pytest.mark.parametrize("name", list(ROWS))
def test_non_contiguous_gradients(name: str) -> None:
    """Transposed/strided gradients: same values as torch given the very same tensors."""
    opt = _opt(name)
    hp = ALL_FLAGS[name]
    shapes = {"w": (4, 6), "v": (5,)}
    init = make_params(shapes, torch.float32, seed=7)
    base = make_grads({"w": (6, 4), "v": (10,)}, torch.float32, seed=8, steps=20)
    grads: list[Grads] = []
    for g in base:
        w, v = g["w"], g["v"]
        assert w is not None and v is not None
        grads.append({"w": w.t(), "v": v[::2]})
    assert not grads[0]["w"].is_contiguous()  # type: ignore[union-attr]
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", list(ROWS))
def test_low_precision_gradients(name: str, grad_dtype: torch.dtype,
                                 param_dtype: torch.dtype) -> None:
    """Half gradients are cast to the param dtype; state stays in the param dtype."""
    opt = _opt(name)
    hp = {"rmsprop": {"momentum": 0.5, "centered": True}, "adagrad": {},
          "sgd": {"momentum": 0.5}}[name]
    init = make_params(SHAPES, param_dtype, seed=9)
    half = make_grads(SHAPES, torch.float32, seed=10, steps=20)
    grads: list[Grads] = [{n: g.to(grad_dtype) for n, g in s.items() if g is not None}
                          for s in half]
    ours = run_ours(opt, hp, init, grads)
    for n, st in ours[1].items():
        for k, t in st.items():
            assert t.dtype == (torch.float32 if k == "step" else param_dtype), (n, k)
    assert_same(opt, hp, ours, run_torch(opt, hp, init, grads))


def test_rmsprop_momentum_switched_on_later() -> None:
    """Momentum turned on mid-run: our buffer starts at zeros (torch would KeyError)."""
    opt = _opt("rmsprop")
    init = make_params(SHAPES, torch.float32, seed=11)
    grads = make_grads(SHAPES, torch.float32, seed=12, steps=20)
    ours = run_ours(opt, {}, init, grads[:10])
    params, state = ours
    model = opt.hyperparams.model_validate({"momentum": 0.9, "centered": True})
    for g in grads[10:]:
        optim.step(opt, params, g, state, model)

    ps = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    topt = torch.optim.RMSprop(list(ps.values()))
    for i, g in enumerate(grads):
        if i == 10:
            topt.param_groups[0].update(momentum=0.9, centered=True)
            for p in ps.values():
                topt.state[p]["momentum_buffer"] = torch.zeros_like(p)
                topt.state[p]["grad_avg"] = torch.zeros_like(p)
        for n, p in ps.items():
            p.grad = g[n]
        topt.step()
    theirs = ({n: p.detach() for n, p in ps.items()},
              {n: dict(topt.state[p]) for n, p in ps.items()})
    assert_same(opt, {}, (params, state), theirs)


def test_sgd_momentum_switched_on_later() -> None:
    """SGD's buffer starts as a copy of the gradient whenever it is missing, as in torch."""
    opt = _opt("sgd")
    init = make_params(SHAPES, torch.float64, seed=13)
    grads = make_grads(SHAPES, torch.float64, seed=14, steps=20)
    params, state = run_ours(opt, {}, init, grads[:10])
    assert state == {}
    model = opt.hyperparams.model_validate({"momentum": 0.9})
    for g in grads[10:]:
        optim.step(opt, params, g, state, model)
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    topt = torch.optim.SGD(list(ps.values()))
    for i, g in enumerate(grads):
        if i == 10:
            topt.param_groups[0]["momentum"] = 0.9
        for n, p in ps.items():
            p.grad = g[n]
        topt.step()
    theirs = ({n: p.detach() for n, p in ps.items()},
              {n: dict(topt.state[p]) for n, p in ps.items()})
    assert_same(opt, {}, (params, state), theirs)


def test_centered_nan_matches_torch() -> None:
    """Constant gradient, centered, alpha=0.9, float32: square_avg - grad_avg**2 rounds below
    zero and sqrt gives NaN. We do exactly what torch does, at the same step, so the engine's
    ``all_finite`` check is what refuses that step."""
    opt = _opt("rmsprop")
    hp = {"alpha": 0.9, "centered": True}
    model = opt.hyperparams.model_validate(hp)
    p = torch.nn.Parameter(torch.ones(4))
    topt = torch.optim.RMSprop([p], **hp)
    params = {"p": torch.ones(4)}
    state: dict[str, dict[str, Tensor]] = {}
    torch_nan = ours_nan = None
    for i in range(1, 301):
        p.grad = torch.full((4,), 3.3)
        topt.step()
        optim.step(opt, params, {"p": torch.full((4,), 3.3)}, state, model)
        torch.testing.assert_close(params["p"], p.detach(), rtol=0, atol=0, equal_nan=True)
        if torch_nan is None and not torch.isfinite(p).all():
            torch_nan = i
        if ours_nan is None and not optim.all_finite(params.values()):
            ours_nan = i
        if torch_nan and ours_nan:
            break
    assert torch_nan is not None, "torch no longer goes NaN here; revisit the docs"
    assert ours_nan == torch_nan
    assert state["p"]["step"].item() == torch_nan


# --------------------------------------------------------------------------------------
# exact path at sizes that block: above 65,536 elements and around the block size

BIG_STEPS = 3  # SGD: the buffer's first step (a copy) and later ones


def big_shapes(dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """Odd sizes over 65,536 elements (where the old default compiled): one block + 1, and
    two blocks with a ragged end. The block size is in bytes, so it depends on the dtype."""
    block = exact.block_numel(torch.empty(0, dtype=dtype))
    return {"w": (block + 1,), "v": (2 * block + 7,)}


@lru_cache(maxsize=2)
def _big_inputs(dtype: torch.dtype) -> tuple[dict[str, Tensor], list[Grads]]:
    shapes = big_shapes(dtype)
    return (make_params(shapes, dtype, seed=31),
            make_grads(shapes, dtype, seed=32, steps=BIG_STEPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "row"), ALL_ROWS, ids=[f"{o}-{r}" for o, r in ALL_ROWS])
def test_exact_bitwise_big(name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = _opt(name), ROWS[name][row]
    init, grads = _big_inputs(dtype)
    assert all(t.numel() > 65_536 and t.numel() % 2 for t in init.values())
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


def test_blocking_really_happens() -> None:
    """The big sizes do take the blocked path (and small or strided ones do not)."""
    block = exact.block_numel(torch.empty(0))
    big = torch.zeros(block + 1)
    assert exact.blockable(big, torch.zeros(block + 1), None)
    assert len(list(exact.blocks(big, big.clone(), big.clone()))) == 2
    assert not exact.blockable(torch.zeros(block))
    assert not exact.blockable(torch.zeros(2, block).t())
    assert not exact.blockable(big, torch.zeros(block + 1, dtype=torch.float64))


@pytest.mark.parametrize("name", list(ROWS))
def test_exact_non_contiguous_big(name: str) -> None:
    """A transposed parameter over the block size: whole-tensor ops, still bitwise."""
    opt, hp = _opt(name), ALL_FLAGS[name]
    block = exact.block_numel(torch.empty(0))
    shape = (3, block // 2 + 1)
    init = {"w": make_params({"w": shape[::-1]}, torch.float32, seed=33)["w"].t()}
    grads = make_grads({"w": shape}, torch.float32, seed=34, steps=3)
    assert not init["w"].is_contiguous()
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


def test_service_default_is_bitwise_above_65536(redis_url: str) -> None:
    """The service's default settings (which used to compile at this size) are torch's bits,
    through the real HTTP stack: centered RMSprop with momentum, 10 steps of 100,000."""
    import httpx

    from optserve.optim import fused

    from conftest import start_thread_server
    from helpers import create, decode, step

    srv = start_thread_server(redis_url=redis_url)
    try:
        assert srv.app.state.engine.kernel == "exact"
        calls = fused.calls
        n = 100_000
        gen = torch.Generator().manual_seed(35)
        w0 = torch.randn(n, generator=gen)
        hp: dict[str, Any] = {"lr": 0.01, "alpha": 0.9, "momentum": 0.9, "centered": True}
        local = torch.nn.Parameter(w0.clone())
        topt = torch.optim.RMSprop([local], **hp)
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            s = create(c, {"w": w0}, hyperparams=hp)
            for _ in range(10):
                g = torch.randn(n, generator=gen) * 10
                local.grad = g.clone()
                topt.step()
                r = step(c, s["id"], {"w": g})
                assert r.status_code == 200, r.text
            assert torch.equal(decode(r)["w"], local.detach())
        assert fused.calls == calls
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------
# step() contract details, all_finite, effective_lr


def test_step_validates_before_changing_anything() -> None:
    opt = _opt("rmsprop")
    hp = opt.hyperparams()
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    state: dict[str, dict[str, Tensor]] = {}
    bad: list[dict[str, Tensor | None]] = [
        {"a": torch.ones(3), "b": torch.ones(3)},  # shape
        {"a": torch.ones(3), "zz": torch.ones(1)},  # unknown name
        {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.int32)},  # dtype
    ]
    for grads in bad:
        with pytest.raises(ValueError):
            optim.step(opt, params, grads, state, hp)
        assert state == {} and torch.equal(params["a"], torch.ones(3))
    with pytest.raises(TypeError):
        optim.step(opt, params, {"a": torch.ones(3)}, state, _opt("sgd").hyperparams())


def test_step_under_autograd_params() -> None:
    """Leaf params that require grad are updated without autograd complaining."""
    opt = _opt("sgd")
    params = {"a": torch.nn.Parameter(torch.ones(3))}
    optim.step(opt, params, {"a": torch.ones(3)}, {}, opt.hyperparams(lr=0.5))
    assert torch.equal(params["a"].detach(), torch.full((3,), 0.5))


def test_all_finite() -> None:
    assert optim.all_finite([torch.ones(3), torch.empty(0), torch.tensor(2.0)])
    assert optim.all_finite([])
    assert not optim.all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not optim.all_finite([torch.tensor([float("inf")], dtype=torch.float64)])
    assert not optim.all_finite(iter([torch.tensor(float("-inf"))]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_agrees_with_isfinite_even_where_the_sum_overflows(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [torch.full((5,), big, dtype=dtype),  # finite, but its sum is inf
             torch.tensor([big, -big, 1.0], dtype=dtype), torch.zeros(0, dtype=dtype),
             torch.tensor([1.0, float("nan")], dtype=dtype),
             torch.tensor([float("inf"), float("-inf")], dtype=dtype),  # sum NaN
             torch.tensor([float("-inf"), 2.0], dtype=dtype), torch.arange(3)]
    for t in cases:
        assert optim.finite(t) == bool(torch.isfinite(t).all()), t


def test_effective_lr() -> None:
    init = make_params(SHAPES, torch.float64, seed=23)
    grads = make_grads(SHAPES, torch.float64, seed=24, steps=5)

    opt = _opt("rmsprop")
    for hp in ({"lr": 0.1}, {"lr": 0.1, "centered": True}):
        model = opt.hyperparams.model_validate(hp)
        _, state = run_ours(opt, hp, init, grads)
        st = state["w"]
        v = st["square_avg"] - (st["grad_avg"] ** 2 if model.centered else 0)
        expected = 0.1 / (v.sqrt() + model.eps)
        torch.testing.assert_close(optim.effective_lr(opt, model, st), expected)
    assert optim.effective_lr(opt, opt.hyperparams(), {}) is None

    opt = _opt("adagrad")
    model = opt.hyperparams(lr=0.1, lr_decay=0.5)
    _, state = run_ours(opt, model.model_dump(), init, grads)
    expected = 0.1 / (1 + 4 * 0.5) / (state["w"]["sum"].sqrt() + model.eps)
    torch.testing.assert_close(optim.effective_lr(opt, model, state["w"]), expected)

    opt = _opt("sgd")
    assert optim.effective_lr(opt, opt.hyperparams(), {}) is None
