"""The native kernel's check against torch's own ops, before it is used (and again with
its own sqrt): any differing bit and :mod:`optserve.optim.native` keeps the block path."""

from __future__ import annotations

import ctypes
from itertools import product
from typing import Any

import torch
from torch import Tensor

from . import native


def self_check(lib: ctypes.CDLL) -> None:
    """Raise unless ``lib`` matches torch's ops bitwise: every structural option and both
    lerp branches at sizes with vector tails, plus one size split over threads."""
    everything = {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "weight_decay": 0.1,
                  "momentum": 0.9, "centered": True, "maximize": True}
    for dtype, n in product(native._DTYPES, (37, 8197)):
        init, grads = _probe_inputs(dtype, n)
        for mx, wd, centered, mom, alpha in product((False, True), (0.0, 0.1), (False, True),
                                                    (0.0, 0.9), (0.99, 0.3)):
            _check_rmsprop(lib, init, grads, {
                "lr": 0.01, "alpha": alpha, "eps": 1e-8, "weight_decay": wd,
                "momentum": mom, "centered": centered, "maximize": mx})
        for mx, wd in product((False, True), (0.0, 0.1)):
            _check_adagrad(lib, init, grads, {
                "lr": 0.05, "lr_decay": 0.01, "weight_decay": wd, "eps": 1e-6,
                "maximize": mx, "initial_accumulator_value": 0.1})
    init, grads = _probe_inputs(torch.float32, 2 * native._PER_THREAD + 3)
    _check_rmsprop(lib, init, grads, everything)


def _probe_inputs(dtype: torch.dtype, n: int) -> tuple[Tensor, list[Tensor]]:
    """Parameters ~N(0, 1); gradients of random sign and magnitudes 1e-3..1e2."""
    gen = torch.Generator().manual_seed(n)
    init = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grads = [((torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
              * 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 5 - 3)
              ).to(dtype) for _ in range(3)]
    return init, grads


def _check_rmsprop(lib: ctypes.CDLL, init: Tensor, grads: list[Tensor], kw: dict[str, Any]
                   ) -> None:
    # The reference is the block path's ops (torch's own, bitwise equal to torch.optim per
    # the conformance tests), not torch.optim: run here while another thread was inside
    # torch.compile, torch.optim.Adagrad's float64 results changed (its lr decay, it seems).
    from .hyperparams import RMSpropHyperparams
    from .rmsprop import _ops

    hp = RMSpropHyperparams.model_validate(kw)
    ref, mine = [init.clone()], [init.clone()]
    for st in (ref, mine):
        st += [torch.zeros_like(init), torch.zeros_like(init) if hp.centered else None,
               torch.zeros_like(init) if hp.momentum > 0 else None]
    for g in grads:
        _ops(ref[0], g, ref[1], ref[2], ref[3], hp, None)  # type: ignore[arg-type]
        if not native._rmsprop(lib, mine[0], g, mine[1], mine[2], mine[3], hp.lr, hp.alpha,
                               hp.eps, hp.weight_decay, hp.momentum, hp.maximize):
            raise RuntimeError("the native rmsprop refused a probe tensor")
    for a, b in zip(mine, ref, strict=True):
        if a is not None and not torch.equal(a, b):
            raise RuntimeError(f"rmsprop {kw} {init.dtype} differs from torch's ops")


def _check_adagrad(lib: ctypes.CDLL, init: Tensor, grads: list[Tensor], kw: dict[str, Any]
                   ) -> None:
    from .adagrad import _clr, _ops
    from .hyperparams import AdagradHyperparams

    hp = AdagradHyperparams.model_validate(kw)
    ref, mine = init.clone(), init.clone()
    ref_sum = torch.full_like(init, hp.initial_accumulator_value)
    my_sum = ref_sum.clone()
    for step, g in enumerate(grads, 1):
        clr = _clr(hp, float(step))
        _ops(ref, g, ref_sum, clr, hp)
        if not native._adagrad(lib, mine, g, my_sum, clr, hp.eps, hp.weight_decay, hp.maximize):
            raise RuntimeError("the native adagrad refused a probe tensor")
    if not (torch.equal(mine, ref) and torch.equal(my_sum, ref_sum)):
        raise RuntimeError(f"adagrad {kw} {init.dtype} differs from torch's ops")
