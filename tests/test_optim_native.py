"""The native exact kernel (``optserve.optim.native``) against torch.optim, bitwise, and its
fallback: every RMSprop and Adagrad row on both exact paths (native and blocks) at sizes
around its chunk, thread split and vector tails; no compiler means the block path, same
bits; the first step never waits for the compiler; a restart loads the cached build.

Where no C++ compiler is installed the native-path cases skip (the block path is then the
only one and the other cases still run); where one is, the kernel must build and pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from optim_cases import ROWS, assert_same, make_grads, make_params, run_ours, run_torch

from optserve import optim
from optserve.optim import exact, native, native_sqrt

HAS_CXX = shutil.which(os.environ.get("CXX") or "c++") is not None
NATIVE_ROWS = [(o, r) for o in ("rmsprop", "adagrad") for r in ROWS[o]]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["native", "native-mkl-sqrt", "blocks"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test on one exact path; the native one must be ready where a compiler is.
    ``native`` uses its own sqrt where this machine proved it equal to MKL's
    (``native_sqrt``), ``native-mkl-sqrt`` calls MKL's as ATen does."""
    if request.param == "blocks":
        monkeypatch.setattr(native, "enabled", False)
        yield request.param
        return
    if not HAS_CXX:
        pytest.skip("no C++ compiler: the native kernel cannot be built here")
    assert native.wait(300), native.status
    assert native_sqrt.wait(300) or native_sqrt.status.startswith("off"), native_sqrt.status
    lib = native._lib
    assert lib is not None
    if request.param == "native-mkl-sqrt":
        native_sqrt.disable(lib)
    try:
        yield request.param
    finally:
        lib.optserve_fast_sqrt(1 if native_sqrt.status == "on" else 0)


def _sizes(dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """Vector tails (1, 7, 17), sizes around the native kernel's 8192-element chunk, a size
    split over two threads with a ragged end, and the block path's block + 1 (an odd 2-D
    shape for one of them)."""
    block = exact.block_numel(torch.empty(0, dtype=dtype))
    return {"a": (1,), "b": (7,), "c": (17,), "d": (8191,), "e": (8193,), "f": (3, 43691),
            "g": (block + 1,), "h": (2 * native._PER_THREAD + 3,)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "row"), NATIVE_ROWS, ids=[f"{o}-{r}" for o, r in NATIVE_ROWS])
def test_bitwise_every_row(path: str, name: str, row: str, dtype: torch.dtype) -> None:
    opt, hp = optim.get_optimizer(name), ROWS[name][row]
    shapes = _sizes(dtype)
    init = make_params(shapes, dtype, seed=41)
    grads = make_grads(shapes, dtype, seed=42, steps=3)
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.6])
def test_centered_lerp_branches(path: str, alpha: float) -> None:
    """grad_avg.lerp_ takes its other formula for weights 1 - alpha >= 0.5."""
    opt = optim.get_optimizer("rmsprop")
    hp = {"alpha": alpha, "centered": True, "momentum": 0.5}
    shapes = {"w": (4099,)}
    init = make_params(shapes, torch.float32, seed=43)
    grads = make_grads(shapes, torch.float32, seed=44, steps=20)
    assert_same(opt, hp, run_ours(opt, hp, init, grads), run_torch(opt, hp, init, grads))


def test_native_really_runs() -> None:
    """Once built, a contiguous float tensor's update goes through the library."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    assert native.wait(300), native.status
    p, g, sa = torch.zeros(5), torch.ones(5), torch.zeros(5)
    assert native.rmsprop(p, g, sa, None, None, 0.01, 0.99, 1e-8, 0.0, 0.0, False)
    assert not native.rmsprop(p.double(), g.double(), sa, None, None, 0.01, 0.99, 1e-8, 0.0,
                              0.0, False)  # state of another dtype: the block path's case
    assert not native.rmsprop(torch.zeros(2, 3).t(), torch.ones(3, 2), torch.zeros(3, 2),
                              None, None, 0.01, 0.99, 1e-8, 0.0, 0.0, False)
    odd = torch.frombuffer(bytearray(24), dtype=torch.float32, offset=1, count=5)
    assert not native.rmsprop(odd, g, sa, None, None, 0.01, 0.99, 1e-8, 0.0, 0.0, False)


_CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from optserve import optim
    from optserve.optim import native
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({"momentum": 0.9, "centered": True})
    gen = torch.Generator().manual_seed(0)
    w0, grads = torch.randn(300_001, generator=gen), [torch.randn(300_001, generator=gen)
                                                     for _ in range(4)]
    t = torch.nn.Parameter(w0.clone())
    topt = torch.optim.RMSprop([t], momentum=0.9, centered=True)
    params, state = {"w": w0.clone()}, {}
    first = None
    for g in grads:
        t.grad = g
        topt.step()
        optim.step(opt, params, {"w": g}, state, hp)
        first = first or native.status
        if first == "building":
            native.wait(300)
    out = {"first": first, "used": native.wait(300), "status": native.status,
           "equal": torch.equal(params["w"], t.detach())
           and torch.equal(state["w"]["grad_avg"], topt.state[t]["grad_avg"]),
           "cached": str(native.build()) if native.status == "ready" else None}
    print(json.dumps(out))
""")


def _child(tmp: Path, **env: str) -> dict[str, object]:
    environ = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp), **env,
               "PYTHONPATH": os.pathsep.join([str(ROOT / "service"), str(ROOT / "clients"),
                                              os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=environ, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_compiler_falls_back_to_the_same_bits(tmp_path: Path) -> None:
    """CXX naming no compiler: the build fails, in the background, and steps stay bitwise."""
    out = _child(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert out["used"] is False and out["equal"] is True, out
    assert "no C++ compiler" in str(out["status"]), out
    assert not list(tmp_path.rglob("*.so"))


def test_first_step_does_not_wait_and_restart_uses_the_cache(tmp_path: Path) -> None:
    """A cold cache: the first step runs (block path) while the build is under way; the next
    process finds the build in the torch extensions directory and compiles nothing."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    cold = _child(tmp_path)
    assert cold["first"] == "building" and cold["used"] is True and cold["equal"], cold
    so = Path(str(cold["cached"]))
    mtime = so.stat().st_mtime_ns
    warm = _child(tmp_path)
    assert warm["used"] is True and warm["equal"] and warm["cached"] == str(so), warm
    assert so.stat().st_mtime_ns == mtime
    # no temporary left behind: the library, and the sqrt proof's lock (and proof, had a
    # child lived the few seconds the full check takes; see native_sqrt)
    others = [p.name for p in so.parent.iterdir() if p != so]
    assert all(re.fullmatch(re.escape(so.stem) + r"\.sqrt-[0-9a-f]{16}\.ok(\.lock)?", name)
               for name in others), others


def test_a_compiler_without_openmp_still_builds_it(tmp_path: Path) -> None:
    """A compiler that cannot link OpenMP (clang without libomp): the kernel is built without
    it, runs on the calling thread, and gives the same bits."""
    real = shutil.which(os.environ.get("CXX") or "c++")
    if real is None:
        pytest.skip("no C++ compiler")
    fake = tmp_path / "bin" / "c++-no-openmp"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && '
                    f'{{ echo "unsupported option -fopenmp" >&2; exit 1; }}; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    out = _child(tmp_path / "ext", CXX=str(fake))
    assert out["used"] is True and out["equal"] is True, out
    assert b"libgomp" not in Path(str(out["cached"])).read_bytes()
