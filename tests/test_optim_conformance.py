"""optserve.optim against torch.optim itself: the plain path bitwise, the fused path closely.

Every expected value comes from running the matching ``torch.optim`` class on the same
inputs (no hard-coded numbers). Tensors are small so the whole file stays fast; fused rows
are a subset that still covers every structural flag, because each flag set compiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from optserve import optim
from optserve.optim import fused as fused_mod

STEPS = 100
SHAPES: dict[str, tuple[int, ...]] = {"w": (3, 5), "b": (7,)}
Grads = dict[str, Tensor | None]

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

# Fused: a subset per optimizer that still switches every structural flag on and off.
FUSED_CASES = [
    ("rmsprop", "default", torch.float32),
    ("rmsprop", "default", torch.float64),
    ("rmsprop", "wd+centered+momentum+maximize", torch.float32),
    ("rmsprop", "wd+centered+momentum+maximize", torch.float64),
    ("rmsprop", "alpha0.9+momentum0.9", torch.float32),
    ("rmsprop", "wd+centered", torch.float32),
    ("adagrad", "all", torch.float32),
    ("adagrad", "lr_decay", torch.float64),
    ("sgd", "default", torch.float32),
    ("sgd", "all", torch.float32),
    ("sgd", "momentum+dampening", torch.float64),
]
# Rows other fused tests reuse, so they share compiled kernels with FUSED_CASES.
FUSED_SHARED = {"rmsprop": RMSPROP_ROWS["wd+centered+momentum+maximize"],
                "adagrad": ADAGRAD_ROWS["all"], "sgd": SGD_ROWS["all"]}
FUSED_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6},
             torch.float64: {"rtol": 1e-12, "atol": 1e-14}}


@pytest.fixture(autouse=True)
def _fuse_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tensors are tiny; by default those take the plain path even with fused=True."""
    monkeypatch.setattr(fused_mod, "FUSED_MIN_NUMEL", 2)


# --------------------------------------------------------------------------------------
# helpers


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
              grad_seq: list[Grads]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Run ``torch.optim.<X>`` with its CPU defaults over the same gradients."""
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
             grad_seq: list[Grads], *, fused: bool = False
             ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    params = {n: t.clone() for n, t in init.items()}
    state: dict[str, dict[str, Tensor]] = {}
    model = opt.hyperparams.model_validate(hp)
    for grads in grad_seq:
        optim.step(opt, params, grads, state, model, fused=fused)
    return params, state


def assert_same(opt: optim.OptimizerDef, hp: dict[str, Any],
                ours: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]],
                theirs: tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]],
                tol: dict[str, float] | None = None) -> None:
    """Params, every state tensor and ``step``: bitwise (tol None) or within ``tol``."""
    (p1, s1), (p2, s2) = ours, theirs

    def check(a: Tensor, b: Tensor, what: str) -> None:
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if tol is None:
            assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max()}"
        else:
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")

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


def _opt(name: str) -> optim.OptimizerDef:
    return optim.get_optimizer(name)


# --------------------------------------------------------------------------------------
# plain path: bitwise


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


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", list(ROWS))
def test_zero_dim_and_empty(name: str, fused: bool) -> None:
    opt = _opt(name)
    hp = {"rmsprop": {"momentum": 0.9, "centered": True}, "adagrad": {"weight_decay": 0.1},
          "sgd": {"momentum": 0.9, "nesterov": True}}[name]
    shapes: dict[str, tuple[int, ...]] = {"s": (), "one": (1,), "e": (0,), "e2": (0, 3)}
    init = make_params(shapes, torch.float32, seed=5)
    grads = make_grads(shapes, torch.float32, seed=6, steps=10)
    assert_same(opt, hp, run_ours(opt, hp, init, grads, fused=fused),
                run_torch(opt, hp, init, grads))


@pytest.mark.parametrize("name", list(ROWS))
def test_non_contiguous_gradients(name: str) -> None:
    """Transposed/strided gradients: same values as torch given the very same tensors."""
    opt = _opt(name)
    hp = FUSED_SHARED[name]
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
    ours_fused = run_ours(opt, hp, init, grads, fused=True)
    assert_same(opt, hp, ours_fused, run_torch(opt, hp, init, grads),
                tol=FUSED_TOL[torch.float32])


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
# fused path: close to torch, exact step counts, compiled once


@pytest.mark.parametrize(("name", "row", "dtype"), FUSED_CASES,
                         ids=[f"{o}-{r}-{str(d)[6:]}" for o, r, d in FUSED_CASES])
def test_fused_close(name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = _opt(name), ROWS[name][row]
    init = make_params(SHAPES, dtype, seed=15)
    grads = make_grads(SHAPES, dtype, seed=16)
    assert optim.warmup(opt, opt.hyperparams.model_validate(hp), dtype) or (
        optim.fused_mode() == "off")
    assert_same(opt, hp, run_ours(opt, hp, init, grads, fused=True),
                run_torch(opt, hp, init, grads), tol=FUSED_TOL[dtype])


def test_fused_compiles_once_across_lr_and_shapes() -> None:
    """A new lr every step (a scheduler) and new shapes reuse the same compiled code."""
    if optim.fused_mode() == "off":
        pytest.skip("OPTSERVE_FUSED=off")
    from torch._dynamo.utils import counters

    opt = _opt("rmsprop")
    base = {"momentum": 0.9}
    assert optim.warmup(opt, opt.hyperparams.model_validate(base))
    graphs = counters["stats"]["unique_graphs"]
    shapes = {"a": (3, 4), "b": (5, 2, 3), "c": (17,), "d": (1000,)}
    params = make_params(shapes, torch.float32, seed=17)
    state: dict[str, dict[str, Tensor]] = {}
    for i, g in enumerate(make_grads(shapes, torch.float32, seed=18, steps=8)):
        hp = opt.hyperparams.model_validate({**base, "lr": 0.01 / (i + 1)})
        optim.step(opt, params, g, state, hp, fused=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(st["step"].item() == 8 for st in state.values())


def test_fused_small_tensors_are_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FUSED_MIN_NUMEL elements, fused=True runs the plain ops: bitwise equal."""
    monkeypatch.setattr(fused_mod, "FUSED_MIN_NUMEL", 16)
    opt, hp = _opt("rmsprop"), FUSED_SHARED["rmsprop"]
    init = make_params(SHAPES, torch.float32, seed=25)  # 15 and 7 elements
    grads = make_grads(SHAPES, torch.float32, seed=26, steps=20)
    assert optim.warmup(opt, opt.hyperparams.model_validate(hp)) or (
        optim.fused_mode() == "off")
    assert_same(opt, hp, run_ours(opt, hp, init, grads, fused=True),
                run_torch(opt, hp, init, grads))


def test_fused_off_is_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPTSERVE_FUSED=off: fused=True runs the plain ops, bitwise equal to torch."""
    monkeypatch.setenv("OPTSERVE_FUSED", "off")
    opt, hp = _opt("rmsprop"), RMSPROP_ROWS["wd+centered+momentum"]
    init = make_params(SHAPES, torch.float32, seed=19)
    grads = make_grads(SHAPES, torch.float32, seed=20, steps=20)
    assert not optim.warmup(opt, opt.hyperparams.model_validate(hp))
    assert_same(opt, hp, run_ours(opt, hp, init, grads, fused=True),
                run_torch(opt, hp, init, grads))


def test_set_fused_mode_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_FUSED", "on")
    try:
        optim.set_fused_mode("off")
        assert optim.fused_mode() == "off"
        assert not optim.warmup(optim.get_optimizer("sgd"), optim.SGDHyperparams())
    finally:
        optim.set_fused_mode(None)
    assert optim.fused_mode() == "on"
    with pytest.raises(ValueError):
        optim.set_fused_mode("maybe")  # type: ignore[arg-type]


def test_fused_compile_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: a failing compile falls back to plain ops; on: it raises."""
    monkeypatch.setattr(fused_mod, "_KERNELS", {})

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    opt, hp = _opt("adagrad"), ADAGRAD_ROWS["all"]
    init = make_params(SHAPES, torch.float32, seed=21)
    grads = make_grads(SHAPES, torch.float32, seed=22, steps=10)
    monkeypatch.setenv("OPTSERVE_FUSED", "auto")
    assert_same(opt, hp, run_ours(opt, hp, init, grads, fused=True),
                run_torch(opt, hp, init, grads))
    monkeypatch.setenv("OPTSERVE_FUSED", "on")
    params = {n: t.clone() for n, t in init.items()}
    with pytest.raises(RuntimeError, match="failed earlier"):
        optim.step(opt, params, grads[0], {}, opt.hyperparams.model_validate(hp), fused=True)
    assert all(torch.equal(params[n], init[n]) for n in init)  # raised before any change
    monkeypatch.setattr(fused_mod, "_KERNELS", {})
    with pytest.raises(RuntimeError, match="no compiler"):
        run_ours(opt, hp, init, grads, fused=True)


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
