"""Known sessions' steps served in front of the middleware stack (api/hot_route.py).

Real uvicorn and Redis, results against `torch.optim` itself. Which way a request went is
read by a spy on the route's `_serve` (its real code still runs); a chunked body (no
Content-Length) always goes the stack's way, for comparison.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from optserve.checks import HYPERPARAMS_META_KEY
from optserve_client import wire

from conftest import ThreadServer, start_thread_server
from helpers import ST, create, decode, snapshot, st_body, step, torch_step
from rawhttp import connect, read_response

HP = {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.1}


@pytest.fixture
def server(redis_url: str) -> Iterator[ThreadServer]:
    srv = start_thread_server(redis_url=redis_url, kernel="exact", body_timeout_s=1.0)
    yield srv
    srv.stop()


_TIMEOUTS = ('optserve_requests_total{method="POST",route="/v1/sessions/{session_id}/step",'
             'status="408"} ')


def _count(text: str, prefix: str) -> float:
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def _spy(srv: ThreadServer) -> list[bool]:
    """One entry per request the route served itself."""
    hot = srv.app.hot
    real = hot._serve
    seen: list[bool] = []

    async def serve(*args: Any) -> None:
        seen.append(True)
        await real(*args)

    hot._serve = serve
    return seen


def _chunked(c: httpx.Client, sid: str, grads: dict[str, torch.Tensor],
             headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    """The same step with its body chunked: the stack serves it."""
    return c.post(f"/v1/sessions/{sid}/step", content=iter([st_body(grads)]),
                  headers={"content-type": ST, **(headers or {})}, params=params)


def _grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return {"w": torch.randn(50, generator=g), "b": torch.randn(3, generator=g)}


def _session(c: httpx.Client) -> tuple[str, dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    w0 = {"w": torch.linspace(-1, 1, 50), "b": torch.tensor([0.5, -0.25, 2.0])}
    sid = create(c, w0, optimizer="rmsprop", hyperparams=HP)["id"]
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in w0.items()}
    return sid, ps, torch.optim.RMSprop(list(ps.values()), **HP)



def test_hot_and_stack_steps_alternate_with_torch_bits_and_the_same_headers(
        server: ThreadServer) -> None:
    seen = _spy(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sid, ps, opt = _session(c)
        heads: dict[bool, httpx.Headers] = {}
        for k in range(12):
            stack = k % 3 == 2
            n = len(seen)
            send = _chunked if stack else step
            r = send(c, sid, _grads(k), {"x-request-id": f"req-{k}"})
            assert r.status_code == 200, r.text
            want = torch_step(ps, opt, _grads(k))
            got = decode(r)
            for name in want:
                assert torch.equal(got[name], want[name]), (k, name)
            assert r.headers["x-request-id"] == f"req-{k}"
            # The first step looks the session up (the stack's way); it is known after.
            assert seen[n:] == ([] if stack or k == 0 else [True])
            heads[not stack] = r.headers
        for name in ("content-type", "x-request-id"):
            assert name in heads[True] and name in heads[False]
        assert sorted(k for k in heads[True] if k not in ("date", "transfer-encoding")) == \
            sorted(k for k in heads[False] if k not in ("date", "transfer-encoding"))
        # return=none: no body either way, the same headers
        n = len(seen)
        r1 = step(c, sid, _grads(20), **{"return": "none"})
        torch_step(ps, opt, _grads(20))
        r2 = _chunked(c, sid, _grads(21), **{"return": "none"})
        torch_step(ps, opt, _grads(21))
        assert seen[n:] == [True] and r1.content == r2.content == b""
        assert int(r2.headers["etag"].strip('"')) == int(r1.headers["etag"].strip('"')) + 1
        assert sorted(k for k in r1.headers if k not in ("date", "x-request-id")) == \
            sorted(k for k in r2.headers if k not in ("date", "x-request-id"))
        got = decode(c.get(f"/v1/sessions/{sid}/params"))
        assert all(torch.equal(got[n_], p.detach()) for n_, p in ps.items())


def test_refusals_replays_and_hyperparameters_answer_as_the_stack_does(
        server: ThreadServer) -> None:
    seen = _spy(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sid, ps, opt = _session(c)
        for k in range(2):
            assert step(c, sid, _grads(k)).status_code == 200
            torch_step(ps, opt, _grads(k))
        before = snapshot(c, sid)
        body = st_body(_grads(5))
        refusals = [  # (body, headers) -> the same status and code either way
            (b"\xff" * len(body), {}),  # not safetensors: 400
            (body, {"if-match": '"1"'}),  # stale: 412
            (body, {"x-optserve-base-version": "99"}),  # from the future: 409
            (body, {"idempotency-key": "x" * 300}),  # malformed header: 422
        ]
        for content, headers in refusals:
            n = len(seen)
            hot = c.post(f"/v1/sessions/{sid}/step", content=content,
                         headers={"content-type": ST, **headers})
            stack = c.post(f"/v1/sessions/{sid}/step", content=iter([content]),
                           headers={"content-type": ST, **headers})
            assert seen[n:] == [True], headers
            assert 400 <= hot.status_code < 500 and hot.status_code == stack.status_code
            assert hot.json()["code"] == stack.json()["code"], headers
            assert hot.headers["content-type"].startswith("application/problem+json")
        assert snapshot(c, sid) == before
        # Hyperparameters in the body's metadata: applied with the step, as PATCH would.
        meta = {HYPERPARAMS_META_KEY: json.dumps({"hyperparams": {"lr": 0.02}})}
        r = c.post(f"/v1/sessions/{sid}/step", headers={"content-type": ST},
                   content=wire.encode_safetensors(_grads(6), meta))
        assert r.status_code == 200, r.text
        for g in opt.param_groups:
            g["lr"] = 0.02
        want = torch_step(ps, opt, _grads(6))
        assert all(torch.equal(decode(r)[k], want[k]) for k in want)
        # An Idempotency-Key: applied once, replayed on a retry, refused with another body.
        key = {"idempotency-key": "hot-route-1"}
        first = step(c, sid, _grads(7), key)
        again = step(c, sid, _grads(7), key)
        want = torch_step(ps, opt, _grads(7))
        assert first.status_code == again.status_code == 200
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.headers["etag"] == first.headers["etag"]
        assert all(torch.equal(decode(again)[k], want[k]) for k in want)
        other = step(c, sid, _grads(8), key)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_mismatch"
        # Deleted (this process still knows the id): 404 first, even for a bad body.
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        n = len(seen)
        for content in (body, b"\xff" * len(body)):
            r = c.post(f"/v1/sessions/{sid}/step", content=content,
                       headers={"content-type": ST})
            assert r.status_code == 404 and r.json()["code"] == "session_not_found"


def test_sync_contributions_take_the_route_and_match_torch(server: ThreadServer) -> None:
    seen = _spy(server)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        w0 = {"w": torch.linspace(-1, 1, 50), "b": torch.tensor([0.5, -0.25, 2.0])}
        sid = create(c, w0, optimizer="rmsprop", hyperparams=HP, mode="sync",
                     sync={"contributions": 1, "timeout_s": 10})["id"]
        ps = {n: torch.nn.Parameter(t.clone()) for n, t in w0.items()}
        opt = torch.optim.RMSprop(list(ps.values()), **HP)
        for k in range(4):
            r = step(c, sid, _grads(k))
            assert r.status_code == 200, r.text
            want = torch_step(ps, opt, _grads(k))
            assert all(torch.equal(decode(r)[n], want[n]) for n in want)
        assert len(seen) == 3  # all but the first (the look-up)


def test_a_stalled_body_on_the_hot_route_is_a_408_and_gives_its_budget_back(
        server: ThreadServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sid, _, _ = _session(c)
        assert step(c, sid, _grads(0)).status_code == 200  # known and cached now
        before = snapshot(c, sid)
        timeouts = _count(c.get("/metrics").text, _TIMEOUTS)  # other tests' count too
        body = st_body(_grads(1))
        sock = connect(server.url, "POST", f"/v1/sessions/{sid}/step",
                       {"Content-Type": ST, "Content-Length": str(len(body)),
                        "X-Request-ID": "stalled"})
        sock.sendall(body[: len(body) // 2])
        t0 = time.monotonic()
        resp = read_response(sock, timeout=10)
        sock.close()
        assert resp.status == 408 and 0.8 < time.monotonic() - t0 < 5
        assert json.loads(resp.body)["code"] == "request_timeout"
        assert resp.headers["x-request-id"] == "stalled"
        assert snapshot(c, sid) == before
        assert server.app.state.body_budget.used == 0
        text = c.get("/metrics").text
        assert _count(text, _TIMEOUTS) == timeouts + 1
        for gauge in ("optserve_requests_in_flight", "optserve_request_body_bytes_in_flight"):
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith(gauge)]
            assert values and sum(values) <= 1  # this scrape itself is in flight


def test_keys_and_tenants_are_checked_as_the_stack_checks_them(redis_url: str) -> None:
    srv = start_thread_server(redis_url=redis_url, kernel="exact",
                              api_keys="alice:hot-ka,bob:hot-kb")
    seen = _spy(srv)
    try:
        alice = {"authorization": "Bearer hot-ka"}
        with httpx.Client(base_url=srv.url, timeout=30, headers=alice) as c:
            sid, ps, opt = _session(c)
            for k in range(3):  # known to this process now
                r = step(c, sid, _grads(k))
                assert r.status_code == 200
                torch_step(ps, opt, _grads(k))
            assert len(seen) == 2
            before = snapshot(c, sid)
            for headers, status in (({"authorization": "Bearer nope"}, 401),
                                    ({"authorization": "Basic hot-ka"}, 401),
                                    ({"authorization": "Bearer hot-kb"}, 404)):
                r = step(c, sid, _grads(9), headers)
                assert r.status_code == status, (headers, r.text)
            assert len(seen) == 2  # none of them reached the route's step
            assert snapshot(c, sid) == before
    finally:
        srv.stop()
