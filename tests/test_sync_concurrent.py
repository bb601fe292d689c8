"""Sync rounds whose contributions land at once, on two server processes: they join the open
round without the session lock (only its close takes it). No contribution is lost or counted
twice: every push of a round answers that round's version and the parameters equal the
weighted-mean reference."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import torch

from helpers import create, decode, step


def test_simultaneous_contributions_all_land_once(make_server: Any) -> None:
    servers = [make_server().url, make_server().url]
    n, workers, rounds = 256, 8, 6
    with httpx.Client(base_url=servers[0], timeout=60) as c:
        s = create(c, {"w": torch.zeros(n)}, mode="sync",
                   sync={"contributions": workers, "timeout_s": 60}, hyperparams={"lr": 0.01})
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(n, generator=gen) for _ in range(rounds)] for _ in range(workers)]
    versions: list[list[int]] = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)
    failures: list[str] = []

    def worker(k: int) -> None:
        with httpx.Client(base_url=servers[k % 2], timeout=60) as c:
            for r in range(rounds):
                barrier.wait()
                resp = step(c, s["id"], {"w": grads[k][r]},
                            {"X-Optserve-Base-Version": str(r), "X-Optserve-Weight": str(k + 1),
                             "Idempotency-Key": f"w{k}-r{r}"})
                if resp.status_code != 200:
                    failures.append(resp.text)
                    return
                versions[k].append(int(resp.headers["x-optserve-version"]))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert versions == [list(range(1, rounds + 1))] * workers
    w = torch.zeros(n, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=0.01)
    total = sum(k + 1 for k in range(workers))
    for r in range(rounds):
        acc = sum(grads[k][r].double() * (k + 1) for k in range(workers))
        w.grad = (acc / total).float()
        opt.step()
    with httpx.Client(base_url=servers[1], timeout=60) as c:
        resp = c.get(f"/v1/sessions/{s['id']}/params")
        assert resp.headers["x-optserve-version"] == str(rounds)
        torch.testing.assert_close(decode(resp)["w"], w.detach(), rtol=1e-5, atol=1e-7)
