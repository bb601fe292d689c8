"""A round's closer hands the outcome and the new parameters to the waiters in its own
process from memory; waiters elsewhere read them from Redis. Both answer the same bits."""

from __future__ import annotations

import threading

import httpx
import pytest
import redis
import torch

from helpers import create, decode, step

pytestmark = pytest.mark.slow

N, WORKERS = 257, 3


def _grad(k: int, r: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(100 * r + k))


def _round(urls: list[str], sid: str, r: int) -> list[httpx.Response]:
    out: list[httpx.Response | None] = [None] * WORKERS

    def push(k: int) -> None:
        with httpx.Client(base_url=urls[k % len(urls)], timeout=60) as c:
            out[k] = step(c, sid, {"w": _grad(k, r)}, {"idempotency-key": f"r{r}-w{k}"})

    threads = [threading.Thread(target=push, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is not None and o.status_code == 200 for o in out), out
    return [o for o in out if o is not None]


def _hgetall_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


@pytest.mark.parametrize("processes", [1, 2])
def test_waiters_get_the_rounds_parameters(make_server, redis_url, processes) -> None:
    servers = [make_server() for _ in range(processes)]
    urls = [s.url for s in servers]
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=urls[0], timeout=60) as c:
        sid = create(c, {"w": torch.zeros(N)}, mode="sync",
                     sync={"contributions": WORKERS, "timeout_s": 30},
                     hyperparams={"lr": 0.01, "momentum": 0.9})["id"]
    w = torch.nn.Parameter(torch.zeros(N))
    opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
    for rnd in range(3):
        before = _hgetall_calls(r)
        answers = _round(urls, sid, rnd)
        w.grad = (sum(_grad(k, rnd).double() for k in range(WORKERS)) / WORKERS).float()
        opt.step()
        for a in answers:  # every worker, closer or waiter, gets the round's parameters
            assert a.headers["x-optserve-version"] == str(rnd + 1)
            assert torch.equal(decode(a)["w"], w.detach())
        if rnd and processes == 1:  # hot session, all waiters local: only the closer's
            assert _hgetall_calls(r) == before + 1  # read of the contributions, no reads back
    r.close()
