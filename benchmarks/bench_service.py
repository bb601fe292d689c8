"""End-to-end step latency: one client, HTTP + Redis + the step, against in-process torch.

    python benchmarks/bench_service.py [--sizes 1e4 1e6 1e7] [--steps 30] [--fused on|off]

Starts its own redis-server and one `uvicorn` optserve process, then times
`POST /v1/sessions/{id}/step` (safetensors both ways, parameters returned) against
`torch.optim.RMSprop.step()` on the same data in this process, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import cpu_model, optserve_server

from optserve_client import wire

ROOT = Path(__file__).resolve().parent.parent


def torch_step_times(n: int, steps: int) -> list[float]:
    p = torch.zeros(n, requires_grad=True)
    opt = torch.optim.RMSprop([p], lr=0.01)
    g = torch.randn(n)
    out = []
    for _ in range(steps + 3):
        p.grad = g
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out[3:]


def service_step_times(port: int, n: int, steps: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"params": {"w": {"dtype": "float32", "shape": [1], "data": [0.0]}}})
    conn.request("POST", "/v1/sessions", body=json.dumps({"hyperparams": {"lr": 0.01}}),
                 headers={"content-type": "application/json"})
    sid = json.loads(conn.getresponse().read())["id"]
    del body
    params = wire.encode_safetensors({"w": torch.zeros(n)})
    conn.request("PUT", f"/v1/sessions/{sid}/params", body=params,
                 headers={"content-type": wire.SAFETENSORS_TYPE})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
    grad = wire.encode_safetensors({"w": torch.randn(n)})
    out = []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/sessions/{sid}/step", body=grad,
                     headers={"content-type": wire.SAFETENSORS_TYPE})
        resp = conn.getresponse()
        data = resp.read()
        out.append(time.perf_counter() - t0)
        assert resp.status == 200, data[:300]
    conn.request("DELETE", f"/v1/sessions/{sid}")
    conn.getresponse().read()
    conn.close()
    return out[3:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e6, 1e7])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--fused", default="on", choices=["on", "off"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with optserve_server(fused=args.fused) as url:
        port = int(url.rsplit(":", 1)[1])
        rows = []
        for size in args.sizes:
            n = int(size)
            steps = args.steps if n <= 1_000_000 else max(10, args.steps // 3)
            svc = service_step_times(port, n, steps)
            loc = torch_step_times(n, steps)
            s50, s99 = statistics.median(svc), sorted(svc)[int(0.99 * (len(svc) - 1))]
            l50 = statistics.median(loc)
            rows.append((n, s50, s99, l50, s50 / l50))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"fused={args.fused}; redis AOF off; one client, safetensors both ways\n")
    print("| elements | service p50 (ms) | service p99 (ms) | torch step p50 (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for n, s50, s99, l50, ratio in rows:
        print(f"| {n:.0e} | {s50 * 1e3:.2f} | {s99 * 1e3:.2f} | {l50 * 1e3:.3f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
