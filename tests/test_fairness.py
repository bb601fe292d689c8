"""Fairness between tenants: tensors per session are bounded, and a session of many small
tensors is stepped off the event loop, so other tenants' steps do not wait for it."""

from __future__ import annotations

import secrets
import statistics
import threading
import time
from typing import Any

import httpx
import torch

from conftest import start_thread_server
from helpers import ST, create, jt, st_body, step


def _assert_too_many(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["code"] == "too_many_tensors" and doc["limit"] == limit


def test_tensors_per_session_are_bounded(redis_url: str) -> None:
    tenant = f"limits{secrets.token_hex(4)}"  # its own (empty) list of sessions
    srv = start_thread_server(redis_url=redis_url, fused="off", max_tensors_per_session=100,
                              api_keys=f"{tenant}:kl")
    try:
        with httpx.Client(base_url=srv.url, headers={"authorization": "Bearer kl"}) as c:
            over = {f"t{i}": torch.zeros(1) for i in range(101)}
            r = c.post("/v1/sessions", json={"params": {n: jt([0.0]) for n in over}})
            _assert_too_many(r, 100)
            assert c.get("/v1/sessions").json()["sessions"] == []  # nothing was created

            s = create(c)  # no parameters yet: the first PUT defines them
            r = c.put(f"/v1/sessions/{s['id']}/params", content=st_body(over),
                      headers={"content-type": ST})
            _assert_too_many(r, 100)
            assert c.get(f"/v1/sessions/{s['id']}").json()["version"] is None
            del over["t100"]
            r = c.put(f"/v1/sessions/{s['id']}/params", content=st_body(over),
                      headers={"content-type": ST})
            assert r.status_code == 200, r.text
            assert step(c, s["id"], {n: torch.ones(1) for n in over}).status_code == 200
    finally:
        srv.stop()


def test_many_tensor_session_does_not_stall_other_tenants(make_server: Any) -> None:
    """A step of a 20,000-tensor session (seconds of per-tensor work) runs off the event
    loop: another tenant's small steps meanwhile stay fast."""
    n = 20_000
    srv = make_server(max_tensors_per_session=n, api_keys="big:kb,small:ks")
    with httpx.Client(base_url=srv.url, timeout=300,
                      headers={"authorization": "Bearer kb"}) as big, \
            httpx.Client(base_url=srv.url, headers={"authorization": "Bearer ks"}) as small:
        names = [f"layer{i}.bias" for i in range(n)]
        s = create(big)
        r = big.put(f"/v1/sessions/{s['id']}/params",
                    content=st_body({k: torch.zeros(1) for k in names}),
                    headers={"content-type": ST})
        assert r.status_code == 200, r.text
        mine = create(small, {"w": torch.zeros(64)})
        for _ in range(3):
            assert step(small, mine["id"], {"w": torch.ones(64)}).status_code == 200

        grads = st_body({k: torch.ones(1) for k in names})
        done = threading.Event()
        result: list[int] = []

        def big_step() -> None:
            try:
                resp = big.post(f"/v1/sessions/{s['id']}/step", content=grads,
                                headers={"content-type": ST})
                result.append(resp.status_code)
            finally:
                done.set()

        t = threading.Thread(target=big_step)
        t.start()
        latencies = []
        while not done.is_set():
            t0 = time.perf_counter()
            r = step(small, mine["id"], {"w": torch.ones(64)})
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        t.join()
        assert result == [200]
        assert len(latencies) >= 5, latencies  # the big step took a while
        p50 = statistics.median(latencies)
        assert p50 < 0.2, f"p50 {p50:.3f} s over {len(latencies)} steps"
