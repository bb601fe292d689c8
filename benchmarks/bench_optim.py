"""RMSprop step time: torch.optim.RMSprop (its CPU default) vs optserve's exact paths (the
default, native: one C++ pass, with its own sqrt and with MKL's; and the block path it
falls back to) vs compiled.

Prints a markdown table (median ms per step and speed-ups over torch) and the machine.
The contenders are timed round-robin, so load from neighbours hits all of them alike.
``--tolerance`` instead measures the compiled kernel's error against torch for every
optimizer and option row of the conformance tests (the README's Exactness numbers).

    python benchmarks/bench_optim.py [--sizes 1e4 1e6 1e7] [--budget 2.0] [--threads N]
    python benchmarks/bench_optim.py --tolerance [--steps 50] [--numel 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import ROOT, cpu_model

from optserve import optim
from optserve.optim import native, native_sqrt

sys.path.insert(0, str(ROOT / "tests"))
from optim_cases import ROWS, make_grads, make_params, norm_rel_err, run_torch

CONFIGS: dict[str, dict[str, object]] = {
    "plain": {},
    "centered+momentum": {"centered": True, "momentum": 0.9},
}


_SCRUB = torch.ones(16 << 20)
"""64 MiB read before every timed call: each contender starts with the last-level cache
holding clean data, not the previous contender's dirty lines (at 1e7 elements, whichever
ran right after torch.optim paid ~3 ms of its write-backs)."""


def time_round_robin(fns: dict[str, Callable[[], None]], budget_s: float,
                     min_repeats: int = 5, max_repeats: int = 500) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, after one warm-up call;
    the cache is scrubbed (see ``_SCRUB``) before each timed call."""
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = time.perf_counter() - start
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            float(_SCRUB.sum())
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def bench(numel: int, hp_values: dict[str, object], budget_s: float) -> dict[str, float]:
    """Time one config at one size; gradients alternate so centered variance stays > 0."""
    opt = optim.get_optimizer("rmsprop")
    hp = opt.hyperparams.model_validate(hp_values)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(numel, generator=gen)
    grads = [torch.randn(numel, generator=gen) for _ in range(2)]

    tparam = torch.nn.Parameter(init.clone())
    topt = torch.optim.RMSprop([tparam], **hp.torch_kwargs())
    names = ("exact", "mkl-sqrt", "blocks", "compiled")
    params = {k: {"w": init.clone()} for k in names}
    states: dict[str, dict[str, dict[str, torch.Tensor]]] = {k: {} for k in names}
    counter = {"torch": 0, **{k: 0 for k in names}}

    def torch_step() -> None:
        tparam.grad = grads[counter["torch"] % 2]
        counter["torch"] += 1
        topt.step()

    def ours(name: str) -> Callable[[], None]:
        kernel: optim.KernelName = "compiled" if name == "compiled" else "exact"

        def run() -> None:
            native.enabled = name != "blocks"
            if name == "mkl-sqrt" and native._lib is not None:
                native_sqrt.disable(native._lib)
            try:
                optim.step(opt, params[name], {"w": grads[counter[name] % 2]}, states[name],
                           hp, kernel=kernel)
            finally:
                native.enabled = True
                if native._lib is not None and native_sqrt.status == "on":
                    native._lib.optserve_fast_sqrt(1)
            counter[name] += 1
        return run

    if not optim.warmup(opt, hp, torch.float32):
        raise SystemExit("torch.compile is not available here")
    return time_round_robin({"torch": torch_step, **{k: ours(k) for k in names}}, budget_s)


def speed(sizes: list[float], budget: float) -> None:
    """The markdown speed table."""
    if not native.wait(300):
        print(f"(the native kernel is unavailable: {native.status}; exact = blocks)\n")
    elif not native_sqrt.wait(600):
        print(f"(the native kernel's own sqrt is {native_sqrt.status}: MKL's in both)\n")
    print("| config | elements | torch.optim.RMSprop ms | exact (native, default) ms "
          "| native with MKL's sqrt ms | exact, block path ms | compiled ms "
          "| native speed-up | MKL-sqrt speed-up | blocks speed-up | compiled speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cname, values in CONFIGS.items():
        for size in sizes:
            n = int(size)
            r = bench(n, values, budget)
            cells = [f"{r[k] * 1e3:.3f}" for k in ("torch", "exact", "mkl-sqrt", "blocks",
                                                       "compiled")]
            ups = [f"{r['torch'] / r[k]:.2f}x" for k in ("exact", "mkl-sqrt", "blocks",
                                                         "compiled")]
            print(f"| {cname} | {n:.0e} | " + " | ".join(cells + ups) + " |", flush=True)


def tolerance(steps: int, numel: int) -> None:
    """The compiled kernel against torch, per row: worst norm-relative error over param and
    state tensors, and the element-wise errors (relative over elements with |torch| >= 1e-3
    of the tensor's largest, absolute everywhere)."""
    print(f"{steps} steps, {numel} elements, gradients 1e-3..1e2\n")
    print("| optimizer | row | dtype | max norm-rel err | max elem rel err | max abs err "
          "| worst tensor |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for dtype in (torch.float32, torch.float64):
        init = make_params({"w": (numel,)}, dtype, seed=1)
        grads = make_grads({"w": (numel,)}, dtype, seed=2, steps=steps)
        for name, rows in ROWS.items():
            opt = optim.get_optimizer(name)
            for row, hp in rows.items():
                model = opt.hyperparams.model_validate(hp)
                params = {"w": init["w"].clone()}
                state: dict[str, dict[str, torch.Tensor]] = {}
                for g in grads:
                    optim.step(opt, params, g, state, model, kernel="compiled")
                tp, ts = run_torch(opt, hp, init, grads)
                pairs = [("param", params["w"], tp["w"])] + [
                    (k, v, ts["w"][k]) for k, v in state.get("w", {}).items() if k != "step"]
                worst = max(pairs, key=lambda x: norm_rel_err(x[1], x[2]))
                nre = norm_rel_err(worst[1], worst[2])
                ere, abse = 0.0, 0.0
                for _, a, b in pairs:
                    d = (a.double() - b.double()).abs()
                    big = b.double().abs() >= 1e-3 * float(b.double().abs().max())
                    ere = max(ere, float((d[big] / b.double().abs()[big]).max()))
                    abse = max(abse, float(d.max()))
                print(f"| {name} | {row} | {str(dtype)[6:]} | {nre:.2e} | {ere:.2e} "
                      f"| {abse:.2e} | {worst[0]} |", flush=True)


def main() -> None:
    """Run every (config, size) pair and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e6, 1e7])
    ap.add_argument("--budget", type=float, default=2.0,
                    help="seconds of timing per (config, size)")
    ap.add_argument("--tolerance", action="store_true",
                    help="measure the compiled kernel's error against torch instead")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (torch and the native kernel both follow it)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--numel", type=int, default=100_000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}\n")
    if args.tolerance:
        tolerance(args.steps, args.numel)
    else:
        speed(args.sizes, args.budget)


if __name__ == "__main__":
    main()
