"""Hyperparameters that ride with a step (API.md, the step section), over the real HTTP stack.

Each step is compared with torch.optim run on the same tensors with the same hyperparameter
changes between its steps; refused steps are compared by the whole exported state.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
import torch

from optserve.store import keys
from optserve_client import spec, wire

from helpers import JS, ST, create, decode, jt, snapshot, step


def st_with(grads: dict[str, torch.Tensor], meta: object) -> bytes:
    """A safetensors step body whose ``__metadata__["optserve"]`` is ``meta`` (as JSON)."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return wire.encode_safetensors(grads, {spec.HYPERPARAMS_META_KEY: text})


def post(c: httpx.Client, sid: str, body: bytes, kind: str = ST, **headers: str
         ) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/step", content=body,
                  headers={"content-type": kind, **headers})


G = [torch.tensor([0.5, -0.25, 1.0]), torch.tensor([-0.1, 0.3, 0.2]),
     torch.tensor([0.7, 0.7, -0.4])]
INIT = torch.tensor([1.0, -2.0, 0.5])


def test_both_formats_apply_hyperparams_to_their_step_like_torch(live_server: str) -> None:
    changes = [{"lr": 0.05, "momentum": 0.9}, {}, {"lr": 0.002, "alpha": 0.8}]
    w = torch.nn.Parameter(INIT.clone())
    opt = torch.optim.RMSprop([w], lr=0.01)
    want = []
    for g, ch in zip(G, changes, strict=True):
        opt.param_groups[0].update(ch)
        w.grad = g.clone()
        opt.step()
        want.append(w.detach().clone())
    with httpx.Client(base_url=live_server, timeout=30) as c:
        sid = create(c, {"w": INIT}, hyperparams={"lr": 0.01})["id"]
        r = post(c, sid, st_with({"w": G[0]}, {"hyperparams": changes[0]}))
        assert r.status_code == 200, r.text
        assert torch.equal(decode(r)["w"], want[0])
        r = post(c, sid, st_body_plain(G[1]))
        assert torch.equal(decode(r)["w"], want[1])  # they stay for the next step
        body = {"tensors": {"w": jt(G[2].tolist())}, "hyperparams": changes[2]}
        r = post(c, sid, json.dumps(body).encode(), JS)
        assert r.status_code == 200, r.text
        assert torch.equal(decode(r)["w"], want[2])
        doc = c.get(f"/v1/sessions/{sid}").json()
        assert doc["version"] == 3
        assert {k: doc["hyperparams"][k] for k in ("lr", "momentum", "alpha")} == \
            {"lr": 0.002, "momentum": 0.9, "alpha": 0.8}


def st_body_plain(g: torch.Tensor) -> bytes:
    return wire.encode_safetensors({"w": g})


def test_refused_step_changes_neither_tensors_nor_hyperparams(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        sid = create(c, {"w": INIT}, hyperparams={"lr": 0.01})["id"]
        assert step(c, sid, {"w": G[0]}).status_code == 200
        before = snapshot(c, sid)
        cases = [
            (st_with({"w": G[1]}, {"hyperparams": {"lr": -1}}), 422, "invalid_hyperparams"),
            (st_with({"w": G[1]}, {"hyperparams": {"centered": True}}), 422,
             "immutable_hyperparam"),
            (st_with({"w": G[1]}, {"hyperparams": {"optimizer": "sgd"}}), 422,
             "invalid_hyperparams"),
            (st_with({"w": G[1]}, {"hyperparams": {"fused": True}}), 422,
             "invalid_hyperparams"),
            (st_with({"nope": G[1]}, {"hyperparams": {"lr": 0.5}}), 422, "unknown_tensor"),
            # a non-finite result refuses the step and so its hyperparameters
            (st_with({"w": torch.full((3,), 3e38)}, {"hyperparams": {"lr": 1e30}}), 422,
             "non_finite_result"),
            (st_with({"w": G[1]}, "{not json"), 400, "malformed_body"),
            (st_with({"w": G[1]}, {"hyperparams": {"lr": 0.5}, "x": 1}), 400,
             "malformed_body"),
            (st_with({"w": G[1]}, {"hyperparams": [1]}), 400, "malformed_body"),
            (json.dumps({"tensors": {"w": jt([1, 1, 1])}, "hyperparams": 3}).encode(), 400,
             "malformed_body"),
        ]
        for body, status, code in cases:
            kind = JS if body.startswith(b"{") else ST
            r = post(c, sid, body, kind)
            assert (r.status_code, r.json()["code"]) == (status, code), r.text
            assert snapshot(c, sid) == before, code
        # the version preconditions win over a bad hyperparameter, as over any 422
        r = post(c, sid, st_with({"w": G[1]}, {"hyperparams": {"lr": -1}}), ST,
                 **{"If-Match": '"7"'})
        assert (r.status_code, r.json()["code"]) == (412, "version_mismatch")
        # PUT params takes no hyperparameters
        r = c.put(f"/v1/sessions/{sid}/params", headers={"If-Match": "*"},
                  json={"tensors": {"w": jt([1, 1, 1])}, "hyperparams": {"lr": 1}})
        assert (r.status_code, r.json()["code"]) == (400, "malformed_body")
        assert snapshot(c, sid) == before


def test_centered_may_change_with_the_first_step(live_server: str) -> None:
    w = torch.nn.Parameter(INIT.clone())
    opt = torch.optim.RMSprop([w], lr=0.01, centered=True)
    w.grad = G[0].clone()
    opt.step()
    with httpx.Client(base_url=live_server, timeout=30) as c:
        sid = create(c, {"w": INIT})["id"]
        r = post(c, sid, st_with({"w": G[0]}, {"hyperparams": {"centered": True}}))
        assert r.status_code == 200, r.text
        assert torch.equal(decode(r)["w"], w.detach())


def test_idempotent_replay_does_not_apply_hyperparams_again(live_server: str) -> None:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        sid = create(c, {"w": INIT}, hyperparams={"lr": 0.01})["id"]
        key = {"Idempotency-Key": "hp-replay-1"}
        r = post(c, sid, st_with({"w": G[0]}, {"hyperparams": {"lr": 0.1}}), ST, **key)
        assert r.status_code == 200
        r = c.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.003}})
        assert r.status_code == 200
        r = post(c, sid, st_with({"w": G[0]}, {"hyperparams": {"lr": 0.1}}), ST, **key)
        assert r.headers["idempotent-replayed"] == "true"
        doc = c.get(f"/v1/sessions/{sid}").json()
        assert (doc["version"], doc["hyperparams"]["lr"]) == (1, 0.003)


def test_kernel_options_accepted_ignored_or_refused_as_torch_does(live_server: str) -> None:
    ok = {"rmsprop": [{"foreach": True}, {"foreach": None, "capturable": False},
                      {"differentiable": False}],
          "adagrad": [{"fused": True}, {"fused": None, "foreach": False}],
          "sgd": [{"fused": False, "foreach": True, "differentiable": False}]}
    refused = {"rmsprop": [{"fused": False}, {"capturable": True}, {"differentiable": True}],
               "adagrad": [{"capturable": False}, {"fused": True, "foreach": True}],
               "sgd": [{"foreach": "yes"}]}
    with httpx.Client(base_url=live_server, timeout=30) as c:
        for opt, rows in ok.items():
            for row in rows:
                doc = create(c, optimizer=opt, hyperparams={"lr": 0.1, **row})
                assert set(doc["hyperparams"]) == set(spec.TORCH_DEFAULTS[opt])  # not stored
                r = c.patch(f"/v1/sessions/{doc['id']}", json={"hyperparams": row})
                assert r.status_code == 200, r.text
        for opt, rows in refused.items():
            for row in rows:
                r = c.post("/v1/sessions", json={"optimizer": opt, "hyperparams": row})
                assert (r.status_code, r.json()["code"]) == (422, "invalid_hyperparams"), row
                assert r.json()["errors"][0]["field"] in row
        r = c.post("/v1/sessions", json={"optimizer": "rmsprop", "hyperparams": {"fused": None}})
        torch_says = _torch_error(torch.optim.RMSprop, fused=None)
        assert torch_says in r.json()["detail"]
        assert "torch.optim." + torch_says in r.json()["detail"]


def _torch_error(cls: type, **kw: object) -> str:
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **kw)
    except (TypeError, ValueError, RuntimeError) as exc:
        return str(exc)
    raise AssertionError("torch accepted it")


def wait_round(redis_url: str, sid: str, n: int) -> None:
    """Until the session's open round holds ``n`` contributions (threads race otherwise)."""
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while int(r.hget(keys.round_(sid), "n") or 0) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r.close()


def sync_push(url: str, sid: str, body: bytes, out: list) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            out.append(post(c, sid, body))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_sync_round_applies_its_hyperparams_and_refuses_others(live_server: str,
                                                              redis_url: str) -> None:
    hp = {"lr": 0.05, "momentum": 0.5}
    with httpx.Client(base_url=live_server, timeout=60) as c:
        sid = create(c, {"w": INIT}, mode="sync", hyperparams={"lr": 0.01},
                     sync={"contributions": 3, "timeout_s": 30})["id"]
        out: list[httpx.Response] = []
        threads = [sync_push(live_server, sid, st_body_plain(G[0]), out)]
        wait_round(redis_url, sid, 1)
        threads.append(sync_push(live_server, sid, st_with({"w": G[1]}, {"hyperparams": hp}),
                                 out))
        wait_round(redis_url, sid, 2)
        # a third contribution with other hyperparameters is refused; the round stays open
        r = post(c, sid, st_with({"w": G[2]}, {"hyperparams": {"lr": 0.07}}))
        assert (r.status_code, r.json()["code"]) == (409, "hyperparams_conflict"), r.text
        assert r.json()["fields"] == ["lr", "momentum"]  # as merged into the session's
        assert c.get(f"/v1/sessions/{sid}").json()["hyperparams"]["lr"] == 0.01
        # the same ones (plus an int for its float, a kernel option: same values) close it
        r = post(c, sid, st_with({"w": G[2]}, {"hyperparams": {
            **hp, "weight_decay": 0, "foreach": True}}))
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(30)
        assert [x.status_code for x in out] == [200, 200]
    w = torch.nn.Parameter(INIT.clone())
    opt = torch.optim.RMSprop([w], **hp)
    w.grad = ((G[0].double() + G[1].double() + G[2].double()) / 3).float()
    opt.step()
    assert torch.equal(decode(r)["w"], w.detach())
    with httpx.Client(base_url=live_server, timeout=60) as c:
        doc = c.get(f"/v1/sessions/{sid}").json()
    assert (doc["version"], doc["hyperparams"]["lr"], doc["hyperparams"]["momentum"]) == \
        (1, 0.05, 0.5)


@pytest.mark.parametrize("carrier", ["first", "last"])
def test_sync_contributions_without_hyperparams_join_a_round_with_them(
        live_server: str, redis_url: str, carrier: str) -> None:
    hp = {"lr": 0.02}
    bodies = [st_with({"w": G[0]}, {"hyperparams": hp}), st_body_plain(G[1])]
    if carrier == "last":
        bodies.reverse()
    with httpx.Client(base_url=live_server, timeout=60) as c:
        sid = create(c, {"w": INIT}, mode="sync", sync={"contributions": 2, "timeout_s": 30}
                     )["id"]
        out: list[httpx.Response] = []
        t = sync_push(live_server, sid, bodies[0], out)
        wait_round(redis_url, sid, 1)
        r = post(c, sid, bodies[1])
        t.join(30)
        assert r.status_code == 200 and out[0].status_code == 200, (r.text, out[0].text)
        assert c.get(f"/v1/sessions/{sid}").json()["hyperparams"]["lr"] == 0.02
