"""Sync mode (API.md): rounds of weighted-mean gradients across workers and server processes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from sync_worker import grad

from helpers import create, decode, snapshot, step

HERE = Path(__file__).resolve().parent


def sync_session(c: httpx.Client, n: int, contributions: int, min_contributions: int | None = None,
                 timeout_s: float = 30.0, **hp: float) -> dict:
    sync = {"contributions": contributions, "timeout_s": timeout_s}
    if min_contributions is not None:
        sync["min_contributions"] = min_contributions
    return create(c, {"w": torch.zeros(n)}, mode="sync", sync=sync,
                  hyperparams={"lr": 0.01, **hp})


def push_async(url: str, sid: str, g: torch.Tensor, out: list, **headers: str) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out.append(step(c, sid, {"w": g}, {k.replace("_", "-"): v
                                               for k, v in headers.items()}))
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.slow
def test_four_workers_two_servers_match_local_reference(make_server) -> None:
    a, b = make_server(), make_server()
    n, rounds, workers = 1000, 5, 4
    with httpx.Client(base_url=a.url, timeout=60) as c:
        s = sync_session(c, n, contributions=workers, momentum=0.9)
    procs = [subprocess.Popen([sys.executable, str(HERE / "sync_worker.py"),
                               (a.url, b.url)[k % 2], s["id"], str(k), str(rounds), str(n)])
             for k in range(workers)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    w = torch.zeros(n, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
    for r in range(rounds):
        acc = sum(grad(k, r, n).double() * (k + 1) for k in range(workers))
        w.grad = (acc / sum(k + 1 for k in range(workers))).float()
        opt.step()
    with httpx.Client(base_url=b.url, timeout=60) as c:
        r = c.get(f"/v1/sessions/{s['id']}/params")
        assert r.headers["x-optserve-version"] == str(rounds)
        torch.testing.assert_close(decode(r)["w"], w.detach(), rtol=1e-5, atol=1e-7)


def test_straggler_round_closes_at_timeout(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sync_session(c, 4, contributions=3, min_contributions=2, timeout_s=1.0)
        out: list = []
        g1, g2 = torch.ones(4), torch.full((4,), 3.0)
        t0 = time.monotonic()
        threads = [push_async(live_server, s["id"], g, out, x_optserve_weight=w)
                   for g, w in ((g1, "1"), (g2, "3"))]
        for t in threads:
            t.join()
        assert time.monotonic() - t0 >= 0.9  # it waited for the straggler until the timeout
        assert [r.status_code for r in out] == [200, 200]
        assert {r.headers["x-optserve-version"] for r in out} == {"1"}
        assert torch.equal(decode(out[0])["w"], decode(out[1])["w"])
        ref = torch.zeros(4, requires_grad=True)
        opt = torch.optim.RMSprop([ref], lr=0.01)
        ref.grad = ((g1.double() * 1 + g2.double() * 3) / 4).float()
        opt.step()
        assert torch.equal(decode(out[0])["w"], ref.detach())


def test_too_few_contributions_fail_the_round(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sync_session(c, 4, contributions=3, timeout_s=0.5)
        before = snapshot(c, s["id"])
        out: list = []
        for t in [push_async(live_server, s["id"], torch.ones(4), out) for _ in range(2)]:
            t.join()
        for r in out:
            assert r.status_code == 409 and r.json()["code"] == "round_failed"
            assert r.json()["current_version"] == 0
        assert snapshot(c, s["id"]) == before
        # The next round starts afresh.
        out = []
        for t in [push_async(live_server, s["id"], torch.ones(4), out) for _ in range(3)]:
            t.join()
        assert [r.status_code for r in out] == [200] * 3


def test_duplicate_and_late_contributions(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sync_session(c, 2, contributions=2, timeout_s=30)
        out: list = []
        ga, gb = torch.tensor([1.0, 2.0]), torch.tensor([5.0, -2.0])
        t1 = push_async(live_server, s["id"], ga, out, idempotency_key="a")
        time.sleep(0.3)
        t2 = push_async(live_server, s["id"], ga, out, idempotency_key="a")  # a retry
        time.sleep(0.3)
        assert c.get(f"/v1/sessions/{s['id']}").json()["version"] == 0  # still one contribution
        t3 = push_async(live_server, s["id"], gb, out, idempotency_key="b")
        for t in (t1, t2, t3):
            t.join()
        assert [r.status_code for r in out] == [200, 200, 200]
        assert {r.headers["x-optserve-version"] for r in out} == {"1"}
        ref = torch.zeros(2, requires_grad=True)
        opt = torch.optim.RMSprop([ref], lr=0.01)
        ref.grad = ((ga.double() + gb.double()) / 2).float()
        opt.step()
        assert torch.equal(decode(out[-1])["w"], ref.detach())
        # Late: a contribution for the closed round 0.
        late = step(c, s["id"], {"w": ga}, {"x-optserve-base-version": "0"})
        assert late.status_code == 409 and late.json()["code"] == "round_closed"
        assert late.json()["current_version"] == 1
        # A retried key of the closed round gets its outcome, not a second application.
        again = step(c, s["id"], {"w": ga}, {"idempotency-key": "a"})
        assert again.status_code == 200 and again.headers["x-optserve-version"] == "1"
        assert c.get(f"/v1/sessions/{s['id']}").json()["version"] == 1
