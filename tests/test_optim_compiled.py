"""The opt-in compiled kernel: within what the README claims, exact step counts, compiled once;
and the ``kernel`` setting reaching it from ``Settings`` (default: exact).

The claim is per tensor, relative to its norm: ``||x_compiled - x_torch|| / ||x_torch||``
at most 1e-6 (float32) or 1e-14 (float64), for parameters and every state tensor. An
element-wise rtol cannot hold near zero (an element of ~0 has no relative error bound).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from optim_cases import (
    ADAGRAD_ROWS,
    ALL_FLAGS,
    ROWS,
    SHAPES,
    assert_same,
    make_grads,
    make_params,
    norm_rel_err,
    run_ours,
    run_torch,
)
from torch import Tensor

from optserve import optim
from optserve.optim import fused as fused_mod
from optserve.settings import Settings

NORM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-14}
"""The README's claim for the compiled kernel (measured: <= 8.3e-8 and 1.6e-16 after 50
steps; ``python benchmarks/bench_optim.py --tolerance``)."""

# A subset per optimizer that still switches every structural flag on and off.
COMPILED_CASES = [
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


@pytest.fixture(autouse=True)
def _compile_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our tensors are tiny; by default those take the exact path even when compiled."""
    monkeypatch.setattr(fused_mod, "FUSED_MIN_NUMEL", 2)


def _opt(name: str) -> optim.OptimizerDef:
    return optim.get_optimizer(name)


@pytest.mark.parametrize(("name", "row", "dtype"), COMPILED_CASES,
                         ids=[f"{o}-{r}-{str(d)[6:]}" for o, r, d in COMPILED_CASES])
def test_compiled_close(name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = _opt(name), ROWS[name][row]
    init = make_params(SHAPES, dtype, seed=15)
    grads = make_grads(SHAPES, dtype, seed=16)
    assert optim.warmup(opt, opt.hyperparams.model_validate(hp), dtype)
    calls = fused_mod.calls
    assert_same(opt, hp, run_ours(opt, hp, init, grads, kernel="compiled"),
                run_torch(opt, hp, init, grads), norm_rtol=NORM_RTOL[dtype])
    assert fused_mod.calls > calls


@pytest.mark.parametrize("name", list(ROWS))
def test_compiled_zero_dim_empty_and_strided(name: str) -> None:
    """0-dim, empty and non-contiguous tensors run exact under kernel="compiled"."""
    opt, hp = _opt(name), ALL_FLAGS[name]
    shapes: dict[str, tuple[int, ...]] = {"s": (), "one": (1,), "e": (0,), "e2": (0, 3)}
    init = make_params(shapes, torch.float32, seed=5)
    init["t"] = make_params({"t": (6, 4)}, torch.float32, seed=7)["t"].t()
    grads = make_grads({**shapes, "t": (4, 6)}, torch.float32, seed=6, steps=10)
    ours = run_ours(opt, hp, init, grads, kernel="compiled")
    theirs = run_torch(opt, hp, init, grads)
    assert_same(opt, hp, ours, theirs)  # bitwise: none of these took the compiled kernel


def test_compiled_compiles_once_across_lr_and_shapes() -> None:
    """A new lr every step (a scheduler) and new shapes reuse the same compiled code."""
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
        optim.step(opt, params, g, state, hp, kernel="compiled")
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(st["step"].item() == 8 for st in state.values())


def test_compiled_small_tensors_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FUSED_MIN_NUMEL elements, kernel="compiled" runs the exact ops: bitwise."""
    monkeypatch.setattr(fused_mod, "FUSED_MIN_NUMEL", 16)
    opt, hp = _opt("rmsprop"), ALL_FLAGS["rmsprop"]
    init = make_params(SHAPES, torch.float32, seed=25)  # 15 and 7 elements
    grads = make_grads(SHAPES, torch.float32, seed=26, steps=20)
    assert optim.warmup(opt, opt.hyperparams.model_validate(hp))
    assert_same(opt, hp, run_ours(opt, hp, init, grads, kernel="compiled"),
                run_torch(opt, hp, init, grads))


def test_kernel_argument() -> None:
    """``fused=`` is the old spelling of ``kernel=``; unknown kernels are errors."""
    opt, hp = _opt("sgd"), ROWS["sgd"]["momentum"]
    init = make_params(SHAPES, torch.float64, seed=27)
    grads = make_grads(SHAPES, torch.float64, seed=28, steps=5)
    model = opt.hyperparams.model_validate(hp)
    params = {n: t.clone() for n, t in init.items()}
    state: dict[str, dict[str, Tensor]] = {}
    for g in grads:
        optim.step(opt, params, g, state, model, fused=False)
    assert_same(opt, hp, (params, state), run_torch(opt, hp, init, grads))
    with pytest.raises(ValueError, match="kernel"):
        optim.step(opt, params, grads[0], state, model, kernel="fast")  # type: ignore[arg-type]


def test_compile_failure_falls_back_to_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing compile logs and leaves that key on the exact path (bitwise)."""
    monkeypatch.setattr(fused_mod, "_KERNELS", {})

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    opt, hp = _opt("adagrad"), ADAGRAD_ROWS["all"]
    init = make_params(SHAPES, torch.float32, seed=21)
    grads = make_grads(SHAPES, torch.float32, seed=22, steps=10)
    assert not optim.warmup(opt, opt.hyperparams.model_validate(hp))
    assert_same(opt, hp, run_ours(opt, hp, init, grads, kernel="compiled"),
                run_torch(opt, hp, init, grads))


# --------------------------------------------------------------------------------------
# the setting: OPTSERVE_KERNEL, the deprecated OPTSERVE_FUSED, and the engine


def test_settings_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTSERVE_FUSED", raising=False)
    monkeypatch.delenv("OPTSERVE_KERNEL", raising=False)
    assert Settings().kernel == "exact"
    monkeypatch.setenv("OPTSERVE_KERNEL", "compiled")
    assert Settings().kernel == "compiled"
    monkeypatch.delenv("OPTSERVE_KERNEL")
    for fused, kernel in (("on", "compiled"), ("off", "exact"), ("auto", "exact")):
        monkeypatch.setenv("OPTSERVE_FUSED", fused)
        with pytest.warns(DeprecationWarning, match="OPTSERVE_KERNEL"):
            assert Settings().kernel == kernel
        with pytest.warns(DeprecationWarning):
            assert Settings(fused=fused).kernel == kernel
    with pytest.warns(DeprecationWarning):
        assert Settings(fused="on", kernel="exact").kernel == "exact"  # explicit kernel wins
    with pytest.raises(ValueError):
        Settings(kernel="fast")


@pytest.fixture
def compiled_app(redis_url: str) -> Iterator[str]:
    from conftest import start_thread_server

    srv = start_thread_server(redis_url=redis_url, kernel="compiled")
    try:
        assert srv.app.state.engine.kernel == "compiled"
        yield srv.url
    finally:
        srv.stop()


def test_create_app_compiled_reaches_the_kernel(compiled_app: str) -> None:
    """Settings(kernel="compiled") reaches optim's compiled kernel through the engine."""
    import httpx

    from helpers import create, decode, step

    n = 100_000  # the real threshold (the autouse fixture lowers it; either way: compiled)
    gen = torch.Generator().manual_seed(29)
    w0 = torch.randn(n, generator=gen)
    local = torch.nn.Parameter(w0.clone())
    topt = torch.optim.RMSprop([local])
    calls = fused_mod.calls
    with httpx.Client(base_url=compiled_app, timeout=120) as c:
        s = create(c, {"w": w0})
        for _ in range(3):
            g = torch.randn(n, generator=gen)
            local.grad = g.clone()
            topt.step()
            r = step(c, s["id"], {"w": g})
            assert r.status_code == 200, r.text
    assert fused_mod.calls >= calls + 3
    assert norm_rel_err(decode(r)["w"], local.detach()) <= NORM_RTOL[torch.float32]
