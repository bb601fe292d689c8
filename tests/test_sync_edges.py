"""Sync-mode edge cases: rounds that lose their session or parameters, odd keys, bad input."""

from __future__ import annotations

import threading
import time

import httpx
import torch

from helpers import ST, create, decode, st_body, step


def sgd_sync(c: httpx.Client, contributions: int, timeout_s: float = 30.0,
             **sync: float) -> dict:
    return create(c, {"w": torch.zeros(1)}, optimizer="sgd", hyperparams={"lr": 1.0},
                  mode="sync", sync={"contributions": contributions, "timeout_s": timeout_s,
                                     **sync})


def push_in_thread(url: str, sid: str, value: float, out: list, **headers: str
                   ) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out.append(step(c, sid, {"w": torch.tensor([value])},
                            {k.replace("_", "-"): v for k, v in headers.items()}))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_replacing_params_fails_the_open_round(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sgd_sync(c, contributions=2)
        out: list = []
        waiter = push_in_thread(live_server, s["id"], 100.0, out)
        time.sleep(0.3)
        put = c.put(f"/v1/sessions/{s['id']}/params", content=st_body({"w": torch.zeros(1)}),
                    headers={"content-type": ST, "if-match": '"0"'})
        assert put.status_code == 200
        waiter.join(timeout=10)
        assert out[0].status_code == 409 and out[0].json()["code"] == "round_failed"
        # The stale contribution is gone: the next round averages only its own two.
        out = []
        threads = [push_in_thread(live_server, s["id"], 1.0, out,
                                  x_optserve_base_version="1") for _ in range(2)]
        for t in threads:
            t.join(timeout=10)
        assert [r.status_code for r in out] == [200, 200]
        assert decode(out[0])["w"].item() == -1.0


def test_deleting_the_session_ends_its_waiters(live_server: str, redis_url: str) -> None:
    import redis

    from optserve.store import keys

    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sgd_sync(c, contributions=2, timeout_s=0.5)
        out: list = []
        waiter = push_in_thread(live_server, s["id"], 1.0, out)
        # Delete once the contribution has landed (a loaded machine may take a while).
        with redis.Redis.from_url(redis_url) as r:
            deadline = time.monotonic() + 10
            while not r.exists(keys.round_(s["id"])) and time.monotonic() < deadline:
                time.sleep(0.01)
        assert c.delete(f"/v1/sessions/{s['id']}").status_code == 204
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        assert out[0].status_code == 409 and out[0].json()["code"] == "round_failed"


def test_gradient_that_overflows_the_param_dtype_is_refused_up_front(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sgd_sync(c, contributions=2, timeout_s=0.5, min_contributions=1)
        r = c.post(f"/v1/sessions/{s['id']}/step",
                   content=st_body({"w": torch.tensor([1e300], dtype=torch.float64)}),
                   headers={"content-type": ST})
        assert r.status_code == 422 and r.json()["code"] == "non_finite_gradient"
        ok = step(c, s["id"], {"w": torch.tensor([2.0])})  # the round is not poisoned
        assert ok.status_code == 200 and decode(ok)["w"].item() == -2.0


def test_idempotency_keys_with_dots_keep_their_gradients(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = sgd_sync(c, contributions=2)
        out: list = []
        threads = [push_in_thread(live_server, s["id"], v, out, idempotency_key=k)
                   for v, k in ((1.0, "site.a"), (3.0, "site.b"))]
        for t in threads:
            t.join(timeout=10)
        assert [r.status_code for r in out] == [200, 200]
        assert decode(out[0])["w"].item() == -2.0


def test_imported_state_counts_as_stepped(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        src = create(c, {"w": torch.zeros(3)})
        assert step(c, src["id"], {"w": torch.ones(3)}).status_code == 200
        state = c.get(f"/v1/sessions/{src['id']}/state").content
        dst = c.post("/v1/sessions", json={}).json()
        assert c.put(f"/v1/sessions/{dst['id']}/state", content=state,
                     headers={"content-type": ST}).status_code == 200
        r = c.patch(f"/v1/sessions/{dst['id']}", json={"optimizer": "adagrad"})
        assert r.status_code == 422 and r.json()["code"] == "immutable_hyperparam"
