"""Sync rounds that close on accumulated weight (a target batch size), their deadline rule,
sync settings changed between rounds, and the checks on them."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis
import torch

from optserve.store import keys

from helpers import create, decode, snapshot, step


def weighted_session(c: httpx.Client, n: int = 4, **sync: float) -> dict:
    return create(c, {"w": torch.zeros(n)}, mode="sync", sync={"timeout_s": 30.0, **sync},
                  hyperparams={"lr": 0.01})


def push(url: str, sid: str, g: torch.Tensor, weight: float, out: list,
         **headers: str) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out.append(step(c, sid, {"w": g}, {"x-optserve-weight": repr(weight), **{
                k.replace("_", "-"): v for k, v in headers.items()}}))
    t = threading.Thread(target=run)
    t.start()
    return t


def in_round(r: redis.Redis, sid: str, n: int) -> float:
    """Wait until the open round holds `n` contributions; their total weight."""
    deadline = time.monotonic() + 20
    while int(r.hget(keys.round_(sid), "n") or 0) < n:
        assert time.monotonic() < deadline, f"the round never reached {n} contributions"
        time.sleep(0.02)
    return float(r.hget(keys.round_(sid), "wsum") or 0)


def in_order(url: str, r: redis.Redis, sid: str, pushes: list[tuple[torch.Tensor, float]],
             **headers: str) -> list[httpx.Response]:
    """Push one after another (each in the round before the next), then wait for all."""
    out: list = []
    threads = []
    for k, (g, w) in enumerate(pushes):
        threads.append(push(url, sid, g, w, out, **headers))
        if k < len(pushes) - 1:
            in_round(r, sid, k + 1)
    for t in threads:
        t.join(timeout=60)
    return out


def rmsprop_reference(rounds: list[list[tuple[torch.Tensor, float]]], n: int = 4
                      ) -> torch.Tensor:
    """torch.optim.RMSprop stepping once per round on its weighted-mean gradient."""
    w = torch.zeros(n, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=0.01)
    for contributions in rounds:
        total = sum(wt for _, wt in contributions)
        w.grad = (sum(g.double() * wt for g, wt in contributions) / total).float()
        opt.step()
    return w.detach()


def grads(k: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(n, generator=gen) for _ in range(k)]


def test_round_closes_at_target_weight_with_the_crossing_contribution(
        live_server: str, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = weighted_session(c, target_weight=4)
        assert s["sync"] == {"contributions": None, "min_contributions": None,
                             "timeout_s": 30.0, "target_weight": 4.0, "min_weight": 4.0}
        g = grads(5)
        # Weights 2, 1 (total 3: open), then 2: the round closes at 5 with all three.
        round1 = [(g[0], 2.0), (g[1], 1.0), (g[2], 2.0)]
        out = in_order(live_server, r, s["id"], round1)
        assert [x.status_code for x in out] == [200] * 3
        assert {x.headers["x-optserve-version"] for x in out} == {"1"}
        ref = rmsprop_reference([round1])
        for x in out:
            torch.testing.assert_close(decode(x)["w"], ref, rtol=1e-6, atol=0)
        # Weights 2, 2: exactly the target, closed by the second.
        round2 = [(g[3], 2.0), (g[4], 2.0)]
        out = in_order(live_server, r, s["id"], round2)
        assert [x.headers["x-optserve-version"] for x in out] == ["2", "2"]
        torch.testing.assert_close(decode(out[0])["w"], rmsprop_reference([round1, round2]),
                                   rtol=1e-6, atol=0)
        # A third worker with weight 1 for that round is too late: it closed without it.
        late = step(c, s["id"], {"w": g[0]}, {"x-optserve-base-version": "1",
                                              "x-optserve-weight": "1"})
        assert late.status_code == 409 and late.json()["code"] == "round_closed"
        assert late.json()["current_version"] == 2


def test_count_and_weight_close_at_whichever_comes_first(live_server: str,
                                                         redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        s = weighted_session(c, contributions=3, target_weight=4)
        g = grads(4)
        out = in_order(live_server, r, s["id"], [(g[0], 1.0), (g[1], 1.0), (g[2], 1.0)])
        assert [x.headers["x-optserve-version"] for x in out] == ["1"] * 3  # by count
        one = step(c, s["id"], {"w": g[3]}, {"x-optserve-weight": "5"})
        assert one.status_code == 200 and one.headers["x-optserve-version"] == "2"  # weight


def test_deadline_steps_with_min_weight_and_fails_below_it(live_server: str,
                                                           redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    g = grads(2)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        met = weighted_session(c, target_weight=10, min_weight=3, timeout_s=1.0)
        t0 = time.monotonic()
        out = in_order(live_server, r, met["id"], [(g[0], 1.0), (g[1], 2.0)])
        assert time.monotonic() - t0 >= 0.9  # it waited for the target until the deadline
        assert [x.status_code for x in out] == [200, 200]
        assert {x.headers["x-optserve-version"] for x in out} == {"1"}
        torch.testing.assert_close(decode(out[0])["w"],
                                   rmsprop_reference([[(g[0], 1.0), (g[1], 2.0)]]),
                                   rtol=1e-6, atol=0)

        unmet = weighted_session(c, target_weight=10, min_weight=4, timeout_s=0.5)
        before = snapshot(c, unmet["id"])
        out = in_order(live_server, r, unmet["id"], [(g[0], 1.0), (g[1], 2.0)])
        for x in out:
            assert x.status_code == 409 and x.json()["code"] == "round_failed"
            assert x.json()["current_version"] == 0
            assert "total weight 3" in x.json()["detail"]
            assert "min_weight=4" in x.json()["detail"]
        assert snapshot(c, unmet["id"]) == before

        strict = weighted_session(c, target_weight=10, timeout_s=0.5)  # min_weight = target
        x = step(c, strict["id"], {"w": g[0]}, {"x-optserve-weight": "9.5"})
        assert x.status_code == 409 and x.json()["code"] == "round_failed"


def test_patched_sync_settings_apply_from_the_next_round(live_server: str,
                                                         redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    url, one = live_server, lambda v: torch.tensor([v])
    with httpx.Client(base_url=url, timeout=60) as c:
        s = create(c, {"w": torch.zeros(1)}, optimizer="sgd", hyperparams={"lr": 1.0},
                   mode="sync", sync={"target_weight": 2, "timeout_s": 30})
        sid = s["id"]
        out = in_order(url, r, sid, [(one(1.0), 1.0), (one(3.0), 1.0)])
        assert decode(out[0])["w"].item() == -2.0

        p = c.patch(f"/v1/sessions/{sid}", json={"sync": {"target_weight": 3}})
        assert p.status_code == 200, p.text
        assert p.json()["sync"] == {"contributions": None, "min_contributions": None,
                                    "timeout_s": 30.0, "target_weight": 3.0, "min_weight": 3.0}
        assert p.json()["version"] == 1
        # Round 2 needs 3: two of weight 1 leave it open.
        out: list = []
        threads = [push(url, sid, one(1.0), 1.0, out)]
        in_round(r, sid, 1)
        threads.append(push(url, sid, one(2.0), 1.0, out))
        assert in_round(r, sid, 2) == 2.0
        # A PATCH while it is open applies from the next round: this one still needs 3.
        p = c.patch(f"/v1/sessions/{sid}", json={"sync": {"target_weight": 1}})
        assert p.status_code == 200 and p.json()["sync"]["target_weight"] == 1.0
        threads.append(push(url, sid, one(3.0), 0.5, out))
        assert in_round(r, sid, 3) == 2.5
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 1
        threads.append(push(url, sid, one(4.0), 0.5, out))
        for t in threads:
            t.join(timeout=60)
        assert [x.headers["x-optserve-version"] for x in out] == ["2"] * 4
        torch.testing.assert_close(decode(out[-1])["w"].double(),
                                   torch.tensor([-2.0 - 6.5 / 3], dtype=torch.float64))
        # Round 3 obeys target 1: one push of weight 1 closes it at once.
        x = step(c, sid, {"w": one(1.0)}, {"x-optserve-weight": "1"})
        assert x.status_code == 200 and x.headers["x-optserve-version"] == "3"

        # From weight back to a count (a null field removes it; the rest is kept).
        p = c.patch(f"/v1/sessions/{sid}", json={"sync": {"target_weight": None,
                                                          "contributions": 2}})
        assert p.json()["sync"] == {"contributions": 2, "min_contributions": 2,
                                    "timeout_s": 30.0}
        out = in_order(url, r, sid, [(one(1.0), 100.0), (one(1.0), 1.0)])
        assert [x.headers["x-optserve-version"] for x in out] == ["4", "4"]


@pytest.mark.parametrize("sync", [
    {"target_weight": 0}, {"target_weight": -1}, {"target_weight": "lots"},
    {"target_weight": 4, "min_weight": 5}, {"target_weight": 4, "min_weight": 0},
    {"contributions": 2, "min_weight": 1}, {"target_weight": 2, "min_contributions": 1},
    {"timeout_s": 5}, {"contributions": 2, "min_contributions": 3},
    {"target_weight": 2, "per_peer": 1},
])
def test_nonsense_sync_settings_are_422(live_server: str, sync: dict) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        r = c.post("/v1/sessions", json={"mode": "sync", "sync": sync})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text


def test_nonsense_sync_patches_are_422_and_change_nothing(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        plain = c.post("/v1/sessions", json={}).json()
        r = c.patch(f"/v1/sessions/{plain['id']}", json={"sync": {"target_weight": 2}})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        inf = c.post("/v1/sessions", content=b'{"mode": "sync", "sync": '
                     b'{"target_weight": Infinity}}', headers={"content-type": "application/json"})
        assert inf.status_code == 422 and inf.json()["code"] == "invalid_request"
        s = weighted_session(c, target_weight=4, min_weight=2)
        for body in ({"sync": {"min_weight": 5}}, {"sync": {"target_weight": -2}},
                     {"sync": {"target_weight": 1}}, {"sync": None},
                     {"sync": {"target_weight": None}}, {"sync": {"bogus": 1}},
                     {"sync": {"min_contributions": 1}}):
            r = c.patch(f"/v1/sessions/{s['id']}", json=body)
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", body
        assert c.get(f"/v1/sessions/{s['id']}").json()["sync"] == s["sync"]
        # A minimum set below its target is kept when the target moves.
        r = c.patch(f"/v1/sessions/{s['id']}", json={"sync": {"target_weight": 8}})
        assert r.json()["sync"]["min_weight"] == 2.0
