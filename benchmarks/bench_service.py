"""End-to-end step latency: one client, HTTP + Redis + the step, against in-process torch.

    python benchmarks/bench_service.py [--sizes 1e4 1e6 1e7] [--steps 30]
        [--persistence aof-everysec|aof-always|rdb|none|all] [--kernel exact|compiled]

Starts its own redis-server (configured as deploy/redis.conf: append-only, fsync every
second, unless --persistence says otherwise) and `optserve serve`, then times
`POST /v1/sessions/{id}/step` (safetensors both ways, parameters returned) against
`torch.optim.RMSprop.step()` on the same data in this process, and prints a Markdown table
with the persistence it ran with, the bytes each step appends to the append-only file (the
median step: its write-ahead record; the mean: with the background checkpoints), how many
times Redis forked to rewrite it (or to snapshot) and how many checkpoints and replayed
steps the server's /metrics counted during the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import redis
import torch
from _common import PERSISTENCE, PrivateServer, cpu_model, loadavg, optserve_server

from optserve_client import wire


@dataclass
class Run:
    """The timings of one size under one persistence, and what Redis wrote meanwhile."""

    times: list[float] = field(default_factory=list)
    aof_deltas: list[int] = field(default_factory=list)  # per step, rewrite-free steps only
    forks: int = 0
    checkpoints: float = 0.0  # full-tensor checkpoints during the run (write-ahead log)
    replays: float = 0.0  # logged steps replayed (a session rebuilt, not hot)


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


def _aof(client: redis.Redis) -> tuple[int | None, int, int]:
    """(aof_current_size or None without AOF, total forks, aof_base_size): the base size
    changes exactly when a rewrite completes, which resets the current size."""
    info = {**client.info("persistence"), **client.info("stats")}
    size = info.get("aof_current_size") if info.get("aof_enabled") else None
    return size, int(info["total_forks"]), int(info.get("aof_base_size", 0))


def _counter(conn: http.client.HTTPConnection, name: str) -> float:
    """The sum of a counter's samples on the server's /metrics (0 when absent)."""
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def service_run(server: PrivateServer, n: int, steps: int) -> Run:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    conn.request("POST", "/v1/sessions", body=json.dumps({"hyperparams": {"lr": 0.01}}),
                 headers={"content-type": "application/json"})
    sid = json.loads(conn.getresponse().read())["id"]
    conn.request("PUT", f"/v1/sessions/{sid}/params",
                 body=wire.encode_safetensors({"w": torch.zeros(n)}),
                 headers={"content-type": wire.SAFETENSORS_TYPE})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
    grad = wire.encode_safetensors({"w": torch.randn(n)})
    client = server.redis.client()
    run = Run()
    ckpt0 = _counter(conn, "optserve_checkpoints_total")
    replay0 = _counter(conn, "optserve_replayed_steps_total")
    before = _aof(client)
    forks0 = before[1]
    for i in range(steps + 3):
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/sessions/{sid}/step", body=grad,
                     headers={"content-type": wire.SAFETENSORS_TYPE})
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - t0
        assert resp.status == 200, data[:300]
        after = _aof(client)  # outside the timed region
        if i >= 3:
            run.times.append(elapsed)
            clean = after[1:] == before[1:]
            if before[0] is not None and after[0] is not None and clean:
                run.aof_deltas.append(after[0] - before[0])  # type: ignore[operator]
        before = after
    run.forks = before[1] - forks0
    run.checkpoints = _counter(conn, "optserve_checkpoints_total") - ckpt0
    run.replays = _counter(conn, "optserve_replayed_steps_total") - replay0
    client.close()
    conn.request("DELETE", f"/v1/sessions/{sid}")
    conn.getresponse().read()
    conn.close()
    return run


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e6, 1e7])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--persistence", default="aof-everysec", choices=[*PERSISTENCE, "all"])
    ap.add_argument("--kernel", default="exact", choices=["exact", "compiled"])
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    modes = list(PERSISTENCE) if args.persistence == "all" else [args.persistence]
    load_before = loadavg()
    rows, described = [], []
    for mode in modes:
        with optserve_server(kernel=args.kernel, persistence=mode) as server:
            described.append(server.describe())
            for size in args.sizes:
                n = int(size)
                steps = (args.steps * 10 if n <= 100_000  # small steps: warm, many samples
                         else args.steps if n <= 1_000_000 else max(10, args.steps // 3))
                # torch first, on a quiet machine: after the service's run Redis may still be
                # rewriting its append-only file or writing a checkpoint in the background.
                loc = torch_step_times(n, steps)
                run = service_run(server, n, steps)
                rows.append((mode, n, run, statistics.median(loc)))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"kernel={args.kernel}; one client, safetensors both ways, parameters returned; "
          f"load average before {load_before}, after {loadavg()}")
    for line in described:
        print(f"  {line}")
    print("\n| persistence | elements | service p50 (ms) | service p99 (ms) "
          "| torch step p50 (ms) | ratio | AOF appended per step (median / mean) "
          "| forks (AOF rewrites or snapshots) | checkpoints / replayed steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, n, run, l50 in rows:
        s = sorted(run.times)
        s50, s99 = statistics.median(s), s[int(0.99 * (len(s) - 1))]
        aof = (f"{_mb(statistics.median(run.aof_deltas))} / "
               f"{_mb(statistics.mean(run.aof_deltas))}") if run.aof_deltas else "-"
        print(f"| {mode} | {n:.0e} | {s50 * 1e3:.2f} | {s99 * 1e3:.2f} | {l50 * 1e3:.3f} "
              f"| {s50 / l50:.1f}x | {aof} | {run.forks} in {len(s) + 3} steps "
              f"| {run.checkpoints:.0f} / {run.replays:.0f} |")
    print("\n| persistence | acknowledged steps lost on a Redis crash | on a machine crash |")
    print("|---|---|---|")
    for mode in modes:
        p = PERSISTENCE[mode]
        print(f"| {mode} | {p.process_crash} | {p.machine_crash} |")


if __name__ == "__main__":
    main()
