"""The cached session's native RMSprop call (optim/native_fast.py), through `update.apply`
as the service calls it, against `torch.optim.RMSprop` itself, bitwise: every option row,
float32 and float64, sizes around the kernel's chunk and thread split; gradients as they
arrive on the wire. Where the fast call does not apply (another gradient dtype, a
read-only buffer, state still to create) the general path gives the same bits and stats.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import torch
from optim_cases import RMSPROP_ROWS, make_grads, make_params

from optserve import optim, update
from optserve.cache import Loaded
from optserve.optim import native, native_fast
from optserve_client import wire

HAS_CXX = shutil.which(os.environ.get("CXX") or "c++") is not None
pytestmark = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler: no native kernel")
CPU = torch.device("cpu")
SHAPES = {"w": (3, 5), "b": (7,), "big": (70_001,)}
STEPS = 12


@pytest.fixture(autouse=True)
def ready() -> None:
    assert native.wait(300), native.status


def _wire(grads: dict[str, torch.Tensor | None], readonly: bool = False
          ) -> dict[str, wire.WireTensor]:
    body = wire.encode_safetensors({n: g for n, g in grads.items() if g is not None})
    decoded, _ = wire.decode_safetensors(body if readonly else bytearray(body))
    return decoded


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each `native_fast.step` call took the step (True) or declined."""
    seen: list[bool] = []
    real = native_fast.step

    def spy(*args: Any) -> Any:
        out = real(*args)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(native_fast, "step", spy)
    return seen


def _torch_run(hp: dict[str, Any], init: dict[str, torch.Tensor],
               seq: list[dict[str, torch.Tensor | None]]) -> tuple[dict, dict]:
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    opt = torch.optim.RMSprop(list(ps.values()), **hp)
    for grads in seq:
        for n, p in ps.items():
            p.grad = None if grads.get(n) is None else grads[n].clone()
        opt.step()
    state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in ps.items()}
    return {n: p.detach().clone() for n, p in ps.items()}, state


@pytest.mark.parametrize("row", list(RMSPROP_ROWS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_matches_torch_bitwise(row: str, dtype: torch.dtype,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    hp_raw = RMSPROP_ROWS[row]
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate(hp_raw)
    init = make_params(SHAPES, dtype, seed=11)
    seq = make_grads(SHAPES, dtype, seed=12, steps=STEPS)
    loaded = Loaded(0, {n: t.clone() for n, t in init.items()}, {})
    seen = _calls(monkeypatch)
    for grads in seq:
        update.apply(opt, hp, loaded, _wire(grads), device=CPU, kernel="exact")
    # The first step creates the state (the general path); the rest take the fast call,
    # except where a gradient is missing for a tensor whose state does not exist yet.
    assert seen[0] is False and sum(seen) >= STEPS - 3, seen
    want_p, want_s = _torch_run(hp_raw, init, seq)
    for n in SHAPES:
        assert torch.equal(loaded.params[n], want_p[n]), n
        assert set(loaded.state[n]) == set(want_s[n]), n
        for k, v in want_s[n].items():
            assert torch.equal(loaded.state[n][k], v), (n, k)


def test_declines_give_the_general_paths_bits_and_stats(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate(RMSPROP_ROWS["wd+centered+momentum"])
    init = make_params(SHAPES, torch.float32, seed=21)
    gen = torch.Generator().manual_seed(22)
    seq = [{n: torch.randn(shape, generator=gen) for n, shape in SHAPES.items()}
           for _ in range(6)]
    fast = Loaded(0, {n: t.clone() for n, t in init.items()}, {})
    slow = Loaded(0, {n: t.clone() for n, t in init.items()}, {})
    seen = _calls(monkeypatch)
    for k, full in enumerate(seq):
        a = update.apply(opt, hp, fast, _wire(full, readonly=k == 3), device=CPU,
                         kernel="exact")
        monkeypatch.setattr(native, "enabled", False)  # the block path: torch's own ops
        b = update.apply(opt, hp, slow, _wire(full), device=CPU, kernel="exact")
        monkeypatch.setattr(native, "enabled", True)
        assert a[0] == b[0]
        for n in full:
            assert torch.equal(fast.params[n], slow.params[n]), (k, n)
        assert a[1].keys() == b[1].keys()
    # The first step creates the state (general path), the read-only body at k=3 declines.
    # (Every second call is the block-path run's, which the fast call declines.)
    assert seen[0::2] == [False, True, True, False, True, True] and not any(seen[1::2])
    # A bf16 gradient is cast by the general path; the fast call declines it.
    bf16 = {n: g.to(torch.bfloat16) for n, g in seq[0].items()}
    before = len(seen)
    update.apply(opt, hp, fast, _wire(bf16), device=CPU, kernel="exact")
    assert seen[before:] == [False]


def test_a_replaced_tensor_is_settled_afresh() -> None:
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({"momentum": 0.5})
    init = make_params({"w": (40,)}, torch.float32, seed=31)
    seq = make_grads({"w": (40,)}, torch.float32, seed=32, steps=3)
    loaded = Loaded(0, {"w": init["w"].clone()}, {})
    for grads in seq[:2]:
        update.apply(opt, hp, loaded, _wire(grads), device=CPU, kernel="exact")
    # The momentum buffer replaced by a new tensor (as an import or PATCH would): the
    # settled call must not write through the old one's address.
    old = loaded.state["w"]["momentum_buffer"]
    loaded.state["w"]["momentum_buffer"] = old.clone()
    kept = old.clone()
    update.apply(opt, hp, loaded, _wire(seq[2]), device=CPU, kernel="exact")
    assert torch.equal(old, kept)
    want_p, want_s = _torch_run({"momentum": 0.5}, init, seq)
    assert torch.equal(loaded.params["w"], want_p["w"])
    assert torch.equal(loaded.state["w"]["momentum_buffer"], want_s["w"]["momentum_buffer"])


def test_the_step_counter_counts_as_torchs_float32_add_even_past_2_to_the_24() -> None:
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate({})
    init = make_params({"w": (16,)}, torch.float32, seed=41)
    seq = make_grads({"w": (16,)}, torch.float32, seed=42, steps=5)
    loaded = Loaded(0, {"w": init["w"].clone()}, {})
    update.apply(opt, hp, loaded, _wire(seq[0]), device=CPU, kernel="exact")
    counter = loaded.state["w"]["step"]
    counter.fill_(2.0 ** 24 - 2)
    want = counter.clone()
    for grads in seq[1:]:
        update.apply(opt, hp, loaded, _wire(grads), device=CPU, kernel="exact")
        want += 1  # torch's own float32 add: sticks at 2**24
        assert loaded.state["w"]["step"] is counter and torch.equal(counter, want)
    assert counter.item() == 2.0 ** 24
