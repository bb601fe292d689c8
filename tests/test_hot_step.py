"""Steps of a session a process holds hot: one guarded round trip, same bits, same history.

Each test runs real `optserve` processes against one real redis-server and compares with
`torch.optim` itself. Which path a step took is read from the process's own
``optserve_hot_steps_total`` counter.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
import torch

from optserve.store import keys

from helpers import create, decode, step, torch_step

pytestmark = pytest.mark.slow

HP = {"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0.5, "weight_decay": 0.1}


def _hot(c: httpx.Client, result: str) -> float:
    """This process's count of hot-path steps with `result`."""
    text = c.get("/metrics").text
    prefix = f'optserve_hot_steps_total{{result="{result}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def _grads(k: int, n: int = 37) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(3, generator=g)}


def _reference(w0: dict[str, torch.Tensor]) -> tuple[dict[str, torch.nn.Parameter],
                                                    torch.optim.RMSprop]:
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in w0.items()}
    return ps, torch.optim.RMSprop(list(ps.values()), **HP)



def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for n, t in want.items():
        assert torch.equal(got[n], t), n


def _new_session(c: httpx.Client) -> tuple[str, dict[str, torch.Tensor]]:
    w0 = {"w": torch.linspace(-1, 1, 37), "b": torch.tensor([0.5, -0.25, 2.0])}
    return create(c, w0, optimizer="rmsprop", hyperparams=HP)["id"], w0


def _ok(resp: httpx.Response) -> dict[str, torch.Tensor]:
    assert resp.status_code == 200, resp.text
    return decode(resp)


def test_hot_steps_take_one_round_trip_and_match_torch(make_server) -> None:
    srv = make_server(checkpoint_steps=4)  # several background and bound checkpoints
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid, w0 = _new_session(c)
        ps, opt = _reference(w0)
        before = _hot(c, "committed")
        for k in range(20):
            _same(_ok(step(c, sid, _grads(k))), torch_step(ps, opt, _grads(k)))
        hot = _hot(c, "committed") - before
        # The first step loads the session (locked path); so do the few that find a
        # background checkpoint still copying its tensors, or the log at its bound.
        # Most go the hot way.
        assert 10 <= hot <= 19, hot
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 20


def test_hot_path_off_when_its_bound_is_zero(make_server) -> None:
    srv = make_server(hot_step_bytes=0)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid, w0 = _new_session(c)
        ps, opt = _reference(w0)
        for k in range(5):
            _same(_ok(step(c, sid, _grads(k))), torch_step(ps, opt, _grads(k)))
        assert _hot(c, "committed") == 0


def test_alternating_processes_never_step_a_stale_copy(make_server) -> None:
    """X and Y both hold the session hot in turn: each finds the other's commit and takes
    the locked path (the script refused: 'moved'), and every result is torch's."""
    x, y = make_server(), make_server()
    with httpx.Client(base_url=x.url, timeout=30) as cx, \
            httpx.Client(base_url=y.url, timeout=30) as cy:
        sid, w0 = _new_session(cx)
        ps, opt = _reference(w0)
        for k in range(12):
            c = cx if (k // 2) % 2 == 0 else cy  # two steps each: the second is hot
            _same(_ok(step(c, sid, _grads(k))), torch_step(ps, opt, _grads(k)))
        assert _hot(cx, "moved") + _hot(cy, "moved") >= 4
        assert _hot(cx, "committed") + _hot(cy, "committed") >= 4
        # A third process, without the session hot, replays the log to the same bits.
        z = make_server()
        with httpx.Client(base_url=z.url, timeout=30) as cz:
            _same(_ok(cz.get(f"/v1/sessions/{sid}/params")),
                  {n: p.detach() for n, p in ps.items()})
            _same(_ok(step(cz, sid, _grads(99))), torch_step(ps, opt, _grads(99)))


def test_a_held_lock_sends_the_hot_step_the_locked_way(make_server, redis_url) -> None:
    srv = make_server()
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid, w0 = _new_session(c)
        ps, opt = _reference(w0)
        _same(_ok(step(c, sid, _grads(0))), torch_step(ps, opt, _grads(0)))  # now hot
        assert r.set(keys.lock(sid), "someone-else", px=1500)
        started = time.monotonic()
        _same(_ok(step(c, sid, _grads(1))), torch_step(ps, opt, _grads(1)))
        assert time.monotonic() - started >= 1.0  # it waited for the lock
        assert _hot(c, "locked") == 1
        _same(_ok(step(c, sid, _grads(2))), torch_step(ps, opt, _grads(2)))
        assert _hot(c, "committed") >= 1
    r.close()


def test_idempotent_retry_of_a_hot_step_is_a_replay(make_server) -> None:
    srv = make_server()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        sid, w0 = _new_session(c)
        ps, opt = _reference(w0)
        _same(_ok(step(c, sid, _grads(0))), torch_step(ps, opt, _grads(0)))
        h = {"idempotency-key": "hot-1"}
        first = step(c, sid, _grads(1), h)
        want = torch_step(ps, opt, _grads(1))
        _same(_ok(first), want)
        assert _hot(c, "committed") == 1
        again = step(c, sid, _grads(1), h)
        _same(_ok(again), want)  # applied once
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["etag"] == first.headers["etag"]
        assert _hot(c, "used") == 1
        other = step(c, sid, _grads(2), h)  # the key with another request
        assert other.status_code in (409, 422), other.text
        # The session is still hot-able and exact after the refusals.
        _same(_ok(step(c, sid, _grads(3))), torch_step(ps, opt, _grads(3)))


def test_concurrent_steps_in_one_process_apply_each_once(make_server) -> None:
    srv = make_server()
    g = _grads(7)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        sid, w0 = _new_session(c)
        ps, opt = _reference(w0)
        _ok(step(c, sid, g))
        torch_step(ps, opt, g)

        def one(_: int) -> int:
            with httpx.Client(base_url=srv.url, timeout=60) as ci:
                return step(ci, sid, g).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(16)))
        assert codes == [200] * 16
        for _ in range(16):
            want = torch_step(ps, opt, g)
        got = _ok(c.get(f"/v1/sessions/{sid}/params"))
        _same(got, want)
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 17
