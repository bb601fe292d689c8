"""RMSprop step time: torch.optim.RMSprop (its CPU default) vs optserve plain vs optserve fused.

Prints a markdown table (median ms per step and speed-ups over torch) and the machine.
The three contenders are timed round-robin, so load from neighbours hits all of them alike.

    python benchmarks/bench_optim.py [--sizes 1e4 1e6 1e7] [--budget 2.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from _common import cpu_model

from optserve import optim

CONFIGS: dict[str, dict[str, object]] = {
    "plain": {},
    "centered+momentum": {"centered": True, "momentum": 0.9},
}


def time_round_robin(fns: dict[str, Callable[[], None]], budget_s: float,
                     min_repeats: int = 5, max_repeats: int = 500) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, after one warm-up call."""
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
    plain_p, fused_p = {"w": init.clone()}, {"w": init.clone()}
    plain_s: dict[str, dict[str, torch.Tensor]] = {}
    fused_s: dict[str, dict[str, torch.Tensor]] = {}
    counter = {"torch": 0, "plain": 0, "fused": 0}

    def torch_step() -> None:
        tparam.grad = grads[counter["torch"] % 2]
        counter["torch"] += 1
        topt.step()

    def plain_step() -> None:
        optim.step(opt, plain_p, {"w": grads[counter["plain"] % 2]}, plain_s, hp)
        counter["plain"] += 1

    def fused_step() -> None:
        optim.step(opt, fused_p, {"w": grads[counter["fused"] % 2]}, fused_s, hp, fused=True)
        counter["fused"] += 1

    if not optim.warmup(opt, hp, torch.float32):
        raise SystemExit("torch.compile is not available here (or OPTSERVE_FUSED=off)")
    return time_round_robin({"torch": torch_step, "plain": plain_step, "fused": fused_step},
                            budget_s)


def main() -> None:
    """Run every (config, size) pair and print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e6, 1e7])
    ap.add_argument("--budget", type=float, default=2.0,
                    help="seconds of timing per (config, size)")
    args = ap.parse_args()

    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}\n")
    print("| config | elements | torch.optim.RMSprop ms | optserve plain ms "
          "| optserve fused ms | fused speed-up | plain speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for cname, values in CONFIGS.items():
        for size in args.sizes:
            n = int(size)
            r = bench(n, values, args.budget)
            print(f"| {cname} | {n:.0e} | {r['torch'] * 1e3:.3f} | {r['plain'] * 1e3:.3f} "
                  f"| {r['fused'] * 1e3:.3f} | {r['torch'] / r['fused']:.2f}x "
                  f"| {r['torch'] / r['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
