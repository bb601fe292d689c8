"""The server's own step commit against a raw socket, at the sizes of a 1e6 / 1e7 session.

    python benchmarks/bench_commit.py [--sizes 1e6 1e7] [--repeat 15] [--loop uvloop|asyncio]

Times `StepTxn.begin` + `StepTxn.commit` exactly as the engine calls them: the write-ahead
record of one float32 gradient (`store.wal.log_cmds`, the gradient a memoryview as a request
body would hold it), and the full-tensor commit a checkpoint makes (parameters + square_avg,
what every step wrote before the log). The reference is one `SET` of the gradient's bytes
written with `socket.sendall` of one preassembled buffer and its reply read: what the socket
does with no client library at all. Redis runs with persistence off, so the figures are the
client's and the socket's, not the disk's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time

import torch

from optserve.session import SessionMeta
from optserve.store import wal
from optserve.store.embedded import EmbeddedRedis
from optserve.store.redis_store import Store, make_redis
from optserve.tensors import to_bytes


def raw_set(path: str, payload: memoryview, repeat: int) -> list[float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    head = f"*3\r\n$3\r\nSET\r\n$8\r\nrawbench\r\n${len(payload)}\r\n".encode()
    buf = head + bytes(payload) + b"\r\n"
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sock.sendall(buf)
        got = b""
        while not got.endswith(b"\r\n"):
            got += sock.recv(64)
        out.append(time.perf_counter() - t0)
    sock.close()
    return out


async def commits(url: str, n: int, repeat: int) -> tuple[list[float], list[float]]:
    store = Store(make_redis(url, 30.0, max_connections=8), idempotency_ttl_s=600,
                  lock_timeout_s=30)
    w = torch.zeros(n)
    meta = SessionMeta.from_json(json.dumps({
        "id": f"bench{n}", "optimizer": "rmsprop", "hyperparams": {"lr": 0.01},
        "mode": "async", "tensors": {"w": {"dtype": "float32", "shape": [n]}},
        "created_at": time.time()}))
    await store.create(meta, {"p.w": to_bytes(w)})
    grad = {"w": torch.randn(n)}
    full = {"p.w": to_bytes(w), "s.w.square_avg": to_bytes(torch.ones(n)),
            "s.w.step": to_bytes(torch.tensor(1.0))}
    logged, checkpointed = [], []
    version = 0
    for i in range(2 * repeat):
        t0 = time.perf_counter()
        async with store.step_txn(meta.id) as txn:
            version += 1
            if i % 2 == 0:
                cmds, _ = wal.log_cmds(meta.id, version, txn.new_nonce(), grad, {"lr": 0.01},
                                       fresh_momentum=False, device_type="cpu")
                await txn.commit(version, log=cmds)
            else:
                await txn.commit(version, full)
        (logged if i % 2 == 0 else checkpointed).append(time.perf_counter() - t0)
    await store.delete(meta.id, "")
    await store.redis.aclose()
    return logged, checkpointed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedRedis(data_dir=tmp, unix_socket=True, appendonly=False) as server:
        print(f"loop={args.loop}; Redis on a unix socket, persistence off; medians (ms) and "
              "the gradient bytes per second they make")
        print("\n| elements | gradient | raw socket SET | step commit (log) | checkpoint commit "
              "(params + square_avg) |")
        print("|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            n = int(size)
            nbytes = 4 * n
            assert server.socket_path is not None
            raw = statistics.median(raw_set(str(server.socket_path),
                                            memoryview(torch.randn(n).numpy()).cast("B"),
                                            args.repeat))
            logged, full = asyncio.run(commits(server.url, n, args.repeat))
            lg, fl = statistics.median(logged), statistics.median(full)
            print(f"| {n:.0e} | {nbytes / 1e6:.0f} MB | {raw * 1e3:.1f} ({nbytes / raw / 1e9:.2f}"
                  f" GB/s) | {lg * 1e3:.1f} ({nbytes / lg / 1e9:.2f} GB/s) | {fl * 1e3:.1f} "
                  f"({2 * nbytes / fl / 1e9:.2f} GB/s) |")


if __name__ == "__main__":
    main()
