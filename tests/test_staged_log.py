"""A large step's log record is sent to Redis while the update runs (`StepTxn.stage`):
it applies only with the step's EXEC, and a step refused after it was sent leaves nothing."""

from __future__ import annotations

import httpx
import pytest
import redis
import torch

from optserve.engine import STAGE_BYTES
from optserve.store import keys
from optserve_client import wire

from helpers import create, decode, step

pytestmark = pytest.mark.slow

N = STAGE_BYTES // 4 + 1000  # float32: just over the staging bound


def _log(r: redis.Redis, sid: str) -> tuple[int, int]:
    return r.xlen(keys.wal(sid)), r.hlen(keys.wal_index(sid))


def test_large_steps_match_torch_and_a_refused_one_leaves_nothing(live_server: str,
                                                                   redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(N, generator=gen)
    with httpx.Client(base_url=live_server, timeout=120) as c:
        sid = create(c, optimizer="rmsprop", hyperparams={"lr": 0.01, "momentum": 0.9})["id"]
        put = c.put(f"/v1/sessions/{sid}/params", content=wire.encode_safetensors({"w": w0}),
                    headers={"content-type": wire.SAFETENSORS_TYPE})
        assert put.status_code == 200, put.text
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.RMSprop([p], lr=0.01, momentum=0.9)
        for _ in range(3):
            g = torch.randn(N, generator=gen)
            resp = step(c, sid, {"w": g})
            assert resp.status_code == 200, resp.text
            p.grad = g
            opt.step()
            assert torch.equal(decode(resp)["w"], p.detach())
        version = c.get(f"/v1/sessions/{sid}").json()["version"]
        log = _log(r, sid)
        bad = torch.randn(N, generator=gen)
        bad[N // 2] = float("inf")
        refused = step(c, sid, {"w": bad})
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "non_finite_gradient"
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == version
        assert _log(r, sid) == log  # the staged record was discarded
        g = torch.randn(N, generator=gen)  # the connection and session work on
        resp = step(c, sid, {"w": g})
        p.grad = g
        opt.step()
        assert torch.equal(decode(resp)["w"], p.detach())
        # Another process's view (the log replayed) has the same bits.
        got = c.get(f"/v1/sessions/{sid}/params")
        assert torch.equal(decode(got)["w"], p.detach())
    r.close()
