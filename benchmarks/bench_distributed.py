"""Throughput and latency of many workers: one sync session, and many async sessions.

    python benchmarks/bench_distributed.py [--workers 1 2 4 8] [--rounds 100]
                                           [--sessions 100] [--steps 20] [--numel 1e4]
                                           [--client-threads 8 0]
                                           [--server-procs 1]

Starts its own redis-server, configured as deploy/ runs it (append-only, ``everysec``)
unless ``--persistence`` says otherwise, and `optserve serve` (``--server-procs`` uvicorn
worker processes), then measures through the SDK's `Client.step` with what the data-parallel
workers (`optserve_client.distributed`) send: base version, weight, Idempotency-Key;
safetensors both ways, parameters returned:

* **sync**: W worker threads push to one sync session (``contributions = W``) for
  ``--rounds`` rounds. steps/s = rounds (optimizer steps) per second; pushes/s = W times
  that; a push's latency includes waiting for the round's last contribution.
* **async**: ``--sessions`` independent async sessions stepped by ``--client-threads``
  client threads (8, as the speed issue measures it: each takes its share of the sessions
  in turn; 0: a thread per session), ``--steps`` pushes per session, all at once.
  steps/s = all sessions' steps per second.

Client threads, the server and Redis share this machine's cores; the Markdown table says
which machine. "retried pushes" counts SDK retries (a 503 with ``Retry-After``, waited out).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import PERSISTENCE, cpu_model, optserve_server

from optserve.store.embedded import find_redis_server
from optserve_client import Client

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 3


def redis_version() -> str:
    try:
        out = subprocess.run([find_redis_server(), "--version"], capture_output=True,
                             text=True, timeout=10).stdout
        return next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")
    except Exception:
        return "?"


def run_threads(n: int, body: Callable[[int, threading.Barrier], list[float]]
                ) -> tuple[list[float], float]:
    """Run ``body(i, barrier)`` in n threads; each warms up, waits at the barrier (which
    starts the clock) and returns its timed latencies. -> (all latencies, wall seconds)."""
    start: list[float] = []
    barrier = threading.Barrier(n + 1)
    lat: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            lat[i] = body(i, barrier)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start.append(time.perf_counter())
    for t in threads:
        t.join()
    wall = time.perf_counter() - start[0]
    if errors:
        raise errors[0]
    return [x for xs in lat for x in xs], wall


def bench_sync(url: str, workers: int, rounds: int, numel: int) -> tuple[float, ...]:
    rng = np.random.default_rng(0)
    with Client(url) as admin:
        s = admin.create_session("rmsprop", {"lr": 1e-3},
                                 {"w": np.zeros(numel, np.float32)}, mode="sync",
                                 sync={"contributions": workers, "timeout_s": 60})
    grads = [{"w": rng.standard_normal(numel, dtype=np.float32)} for _ in range(workers)]
    retries = [0] * workers

    def body(i: int, barrier: threading.Barrier) -> list[float]:
        with Client(url) as c:
            # what SyncWorker.step sends: the round (base version), a weight, a fresh key
            v = 0
            for _ in range(WARMUP):
                v = c.step(s.id, grads[i], base_version=v, weight=1.0).version
            barrier.wait()
            out = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = c.step(s.id, grads[i], base_version=v, weight=1.0)
                out.append(time.perf_counter() - t0)
                v = r.version
                retries[i] += r.attempts - 1
            return out

    lat, wall = run_threads(workers, body)
    with Client(url) as admin:
        assert admin.get_session(s.id).version == WARMUP + rounds
        admin.delete_session(s.id)
    p50, p99 = np.percentile(lat, [50, 99])
    return rounds / wall, workers * rounds / wall, p50, p99, sum(retries)


def bench_async(url: str, sessions: int, steps: int, numel: int,
                threads: int) -> tuple[float, ...]:
    """`sessions` async sessions stepped by `threads` client threads, each taking its share
    of the sessions in turn (0 threads: one per session)."""
    rng = np.random.default_rng(1)
    threads = threads or sessions
    with Client(url) as admin:
        ids = [admin.create_session("rmsprop", {"lr": 1e-3},
                                    {"w": np.zeros(numel, np.float32)}).id
               for _ in range(sessions)]
    grad = {"w": rng.standard_normal(numel, dtype=np.float32)}
    client = Client(url, max_connections=threads)  # one pool, a connection per thread
    retries = [0] * threads

    def body(i: int, barrier: threading.Barrier) -> list[float]:
        # what AsyncWorker.step sends: the base version and a fresh Idempotency-Key
        mine = ids[i::threads]
        v = dict.fromkeys(mine, 0)
        for _ in range(WARMUP):
            for sid in mine:
                v[sid] = client.step(sid, grad, base_version=v[sid]).version
        barrier.wait()
        out = []
        for _ in range(steps):
            for sid in mine:
                t0 = time.perf_counter()
                r = client.step(sid, grad, base_version=v[sid])
                out.append(time.perf_counter() - t0)
                v[sid] = r.version
                retries[i] += r.attempts - 1
        return out

    try:
        lat, wall = run_threads(threads, body)
        for sid in ids:
            client.delete_session(sid)
    finally:
        client.close()
    p50, p99 = np.percentile(lat, [50, 99])
    return sessions * steps / wall, sessions * steps / wall, p50, p99, sum(retries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=100, help="timed sync rounds")
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per async session")
    ap.add_argument("--client-threads", nargs="+", type=int, default=[8, 0],
                    help="client threads stepping the async sessions (0: one per session)")
    ap.add_argument("--numel", type=float, default=1e4, help="float32 elements per session")
    ap.add_argument("--server-procs", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--kernel", default="exact", choices=["exact", "compiled"])
    ap.add_argument("--persistence", default="aof-everysec", choices=list(PERSISTENCE))
    args = ap.parse_args()
    numel = int(args.numel)
    rows = []
    with optserve_server(kernel=args.kernel, workers=args.server_procs,
                         persistence=args.persistence) as server:
        url, described = server.url, server.describe()
        for w in args.workers:
            row = bench_sync(url, w, args.rounds, numel)
            rows.append((f"sync, 1 session, {w} worker{'s' if w > 1 else ''}", *row))
            print(f"sync {w}: {row[0]:.0f} steps/s", file=sys.stderr)
        for threads in args.client_threads:
            row = bench_async(url, args.sessions, args.steps, numel, threads)
            who = f"{threads} client threads" if threads else "1 worker each"
            rows.append((f"async, {args.sessions} sessions, {who}", *row))
    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}; "
          f"Python {platform.python_version()}, torch {torch.__version__}, redis "
          f"{redis_version()}; {described}; {args.server_procs} server process(es), "
          f"kernel={args.kernel}; {numel:.0e} float32 elements per session; client threads "
          "on the same machine\n")
    print("| scenario | optimizer steps/s | pushes/s | push p50 (ms) | push p99 (ms) "
          "| retried pushes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, sps, pps, p50, p99, retried in rows:
        print(f"| {name} | {sps:.0f} | {pps:.0f} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} "
              f"| {retried} |")


if __name__ == "__main__":
    main()
