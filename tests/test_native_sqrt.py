"""The native kernel's own float32 sqrt (``optserve.optim.native_sqrt``): on where this
machine proved it equal to MKL's for every input, equal again on the re-checked runs, and
the whole kernel bitwise equal to torch.optim on the inputs its sqrt hands to MKL (zeros,
subnormals, negatives, huge values); the proof is per CPU and MKL setting.

Where MKL runs another kernel (Intel CPUs) the check fails and MKL's sqrt is kept: the
cases that need the fast sqrt on skip there, the rest still run.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch
from optim_cases import run_ours, run_torch

from optserve import optim
from optserve.optim import native, native_sqrt

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None,
                                reason="no C++ compiler: no native kernel")


@pytest.fixture
def fast() -> None:
    assert native.wait(300), native.status
    if not native_sqrt.wait(300) and native_sqrt.BUSY in native_sqrt.status:
        # a server of this suite was proving it when this process started: wait for it
        lib_path = native.build()
        proof = lib_path.with_name(f"{lib_path.stem}.sqrt-{native_sqrt.fingerprint()}.ok")
        deadline = time.monotonic() + 300
        while not proof.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert native._lib is not None
        native_sqrt.enable(native._lib, lib_path, threading.Event())
    if native_sqrt.status != "on":
        pytest.skip(f"fast sqrt not used on this machine: {native_sqrt.status}")


def _count_differences(ranges: tuple[tuple[int, int], ...]) -> int:
    assert native._lib is not None
    return native_sqrt._differences(native._lib, ranges, 2, threading.Event())


def test_proof_on_disk_and_quick_runs_equal(fast: None) -> None:
    """The full check left its record by the library, and the start-up runs differ nowhere."""
    lib_path = native.build()
    proofs = list(lib_path.parent.glob(f"{lib_path.stem}.sqrt-{native_sqrt.fingerprint()}.ok"))
    assert len(proofs) == 1
    assert _count_differences(native_sqrt._QUICK) == 0


def test_check_runs_equal_through_both_paths(fast: None) -> None:
    """The check compares bits: with the fast path on, a run of inputs through it and MKL is
    equal; the count is of elements (a NaN payload or a sign of zero would count)."""
    assert _count_differences(((0x3F80_0000, 0x3F80_0000 + 4096),)) == 0
    # -0.0 and the negative subnormals go to MKL: equal by construction, still compared
    assert _count_differences(((0x8000_0000, 0x8000_1000),)) == 0


def test_fingerprint_follows_mkl_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MKL dispatch setting changes which kernel runs, so it needs a proof of its own."""
    before = native_sqrt.fingerprint()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    assert native_sqrt.fingerprint() != before


def _assert_same_bits(ours: tuple, theirs: tuple) -> None:
    """Params and state bit for bit (NaN payloads included: torch.equal says NaN != NaN)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int32) if t.dtype == torch.float32 else t
    (p1, s1), (p2, s2) = ours, theirs
    assert p1.keys() == p2.keys() and s1.keys() == s2.keys()
    for n in p1:
        assert torch.equal(bits(p1[n]), bits(p2[n])), n
        for k, v in s2[n].items():
            assert torch.equal(bits(s1[n][k].reshape(v.shape)), bits(v)), (n, k)


def _special_inputs(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor],
                                                  list[dict[str, torch.Tensor | None]]]:
    """Gradients with exact zeros (square_avg stays 0), subnormal squares, huge values."""
    n = 4 * 8192 + 5
    gen = torch.Generator().manual_seed(7)
    init = {"w": torch.randn(n, generator=gen, dtype=dtype)}
    grads: list[dict[str, torch.Tensor | None]] = []
    for step in range(4):
        g = torch.randn(n, generator=gen, dtype=dtype)
        g[: n // 4] = 0.0                          # zero forever: sqrt(0)
        g[n // 4: n // 2] *= 1e-22                 # squares near or below the subnormals
        g[n // 2: n // 2 + 64] = 3e18 * (step + 1)  # squares near FLT_MAX / inf
        grads.append({"w": g})
    return init, grads


@pytest.mark.parametrize("row", [{}, {"centered": True, "momentum": 0.9, "alpha": 0.5},
                                 {"weight_decay": 0.1, "maximize": True}],
                         ids=["plain", "centered", "wd-max"])
def test_rmsprop_special_values_bitwise(fast: None, row: dict[str, object]) -> None:
    opt = optim.get_optimizer("rmsprop")
    init, grads = _special_inputs(torch.float32)
    ours, theirs = run_ours(opt, row, init, grads), run_torch(opt, row, init, grads)
    assert int(theirs[0]["w"].isnan().sum()) < init["w"].numel() // 8  # mostly numbers
    _assert_same_bits(ours, theirs)


def test_adagrad_special_values_bitwise(fast: None) -> None:
    opt = optim.get_optimizer("adagrad")
    row = {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.0}
    init, grads = _special_inputs(torch.float32)
    _assert_same_bits(run_ours(opt, row, init, grads), run_torch(opt, row, init, grads))
