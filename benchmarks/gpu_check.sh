#!/usr/bin/env bash
# On a machine with a CUDA GPU, in under ~5 minutes:
#   1. the CUDA tests (pytest -m gpu: every option row bitwise against torch.optim on the GPU),
#   2. an exactness check at 1e7 elements against torch.optim.RMSprop on the same GPU,
#   3. the exact kernel's achieved memory bandwidth (minimum bytes read + written per step /
#      median step time) against the card's peak.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root; needs torch with CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/service:$PWD/clients${PYTHONPATH:+:$PYTHONPATH}"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true

echo "== 1. CUDA tests"
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests

echo "== 2+3. exactness at 1e7 and bandwidth"
timeout 120 python - <<'PY'
import statistics

import torch

from optserve import optim

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
clock_khz = getattr(props, "memory_clock_rate", 0)
bus_bits = getattr(props, "memory_bus_width", 0)
peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
print(f"device: {props.name}, torch {torch.__version__}, peak "
      + (f"{peak / 1e9:.0f} GB/s (2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit)"
         if peak else "unknown (no memory_clock_rate/memory_bus_width in this torch)"))

# bytes a step must move at least, in units of the tensor size: reads + writes
CONFIGS = {"plain": ({}, 3 + 2), "centered+momentum": ({"centered": True, "momentum": 0.9},
                                                       5 + 4)}
n = 10_000_000
opt = optim.get_optimizer("rmsprop")
for cname, (hpd, passes) in CONFIGS.items():
    hp = opt.hyperparams.model_validate(hpd)
    gen = torch.Generator(device=dev).manual_seed(0)
    w0 = torch.randn(n, device=dev, generator=gen)
    grads = [torch.randn(n, device=dev, generator=gen) for _ in range(5)]
    tp = torch.nn.Parameter(w0.clone())
    topt = torch.optim.RMSprop([tp], **hpd)
    params, state = {"w": w0.clone()}, {}
    for g in grads:
        tp.grad = g
        topt.step()
        optim.step(opt, params, {"w": g}, state, hp)
    same = torch.equal(params["w"], tp.detach()) and all(
        torch.equal(v, topt.state[tp][k]) for k, v in state["w"].items())
    print(f"{cname}: bitwise equal to torch.optim.RMSprop on the GPU after 5 steps: {same}")
    if not same:
        raise SystemExit(1)
    times = {"optserve": [], "torch": []}
    for _ in range(50):
        for who in times:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if who == "torch":
                tp.grad = grads[0]
                topt.step()
            else:
                optim.step(opt, params, {"w": grads[0]}, state, hp)
            end.record()
            torch.cuda.synchronize()
            times[who].append(start.elapsed_time(end) / 1e3)
    for who, ts in times.items():
        t = statistics.median(ts)
        bw = passes * n * 4 / t
        share = f", {bw / peak:.0%} of peak" if peak else ""
        print(f"  {who}: {t * 1e3:.3f} ms/step, {bw / 1e9:.0f} GB/s effective{share}")
PY
echo "gpu_check: OK"
