"""The write-ahead path: a step commits its gradient, not the full tensors; checkpoints land
off the acknowledgement path; any process rebuilds a session bitwise from checkpoint + log.

Every comparison is bitwise (torch.equal) against real torch, or against the same session
served hot by one process.
"""

from __future__ import annotations

import httpx
import pytest
import redis
import torch

from optserve.store import keys
from optserve_client import wire

from helpers import ST, create, decode, st_body, step

pytestmark = pytest.mark.slow

HP = {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.01}
SHAPES = {"w": (5, 3), "b": (4,)}


class Ref:
    """The same session in real torch."""

    def __init__(self, seed: int = 0, **hp: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = {n: torch.nn.Parameter(torch.randn(s, generator=gen))
                       for n, s in SHAPES.items()}
        self.opt = torch.optim.RMSprop(list(self.params.values()), **{**HP, **hp})

    def initial(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].clone() if n in grads else None
        self.opt.step()

    def equal(self, got: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(got[n], p.detach()) for n, p in self.params.items())

    def state_equal(self, exported: dict[str, torch.Tensor]) -> bool:
        for n, p in self.params.items():
            for key, t in self.opt.state[p].items():
                if not torch.equal(exported[f"state.{n}.{key}"], t):
                    return False
        return self.equal({n: exported[f"param.{n}"] for n in self.params})


def grads_for(i: int, partial: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    g = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    if partial and i % 4 == 3:
        del g["b"]  # a step that touches only some tensors
    return g


def new_session(c: httpx.Client, ref: Ref, **hp: float) -> str:
    return create(c, ref.initial(), hyperparams={**HP, **hp})["id"]


def params(c: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = c.get(f"/v1/sessions/{sid}/params", headers={"accept": ST})
    assert r.status_code == 200, r.text
    return decode(r)


def exported(c: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = c.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    tensors, _ = wire.decode_safetensors(r.content)
    return {n: wire.to_torch(t, copy=True) for n, t in tensors.items()}


def ok_step(c: httpx.Client, sid: str, g: dict[str, torch.Tensor], key: str | None = None,
            replayed: bool = False) -> dict[str, torch.Tensor]:
    r = step(c, sid, g, {"idempotency-key": key} if key else None)
    assert r.status_code == 200, r.text
    assert (r.headers.get("idempotent-replayed") == "true") == replayed
    return decode(r)


def log_len(url: str, sid: str) -> int:
    return redis.Redis.from_url(url).xlen(keys.wal(sid))


def test_checkpoint_every_k_steps_matches_torch(make_server, redis_url: str) -> None:
    x = make_server(checkpoint_steps=3)
    ref = Ref()
    with httpx.Client(base_url=x.url, timeout=30) as c:
        sid = new_session(c, ref)
        for i in range(20):
            g = grads_for(i)
            ref.step(g)
            assert ref.equal(ok_step(c, sid, g))
            assert log_len(redis_url, sid) <= 2 * 3
            if i % 5 == 4:
                assert ref.equal(params(c, sid))
                assert ref.state_equal(exported(c, sid))
        ck = redis.Redis.from_url(redis_url).hget(keys.checkpoint(sid), keys.CKPT_VERSION)
        assert ck is not None and int(ck) >= 14  # background checkpoints landed
        assert c.delete(f"/v1/sessions/{sid}").status_code == 204
    assert redis.Redis.from_url(redis_url).keys(f"{keys.PREFIX}:{{s:{sid}}}:*") == []


def test_sigkill_server_between_checkpoints(make_server, redis_url: str) -> None:
    x = make_server(checkpoint_steps=1000)
    ref = Ref(seed=1)
    with httpx.Client(base_url=x.url, timeout=30) as c:
        sid = new_session(c, ref)
        for i in range(6):
            ref.step(grads_for(i))
            assert ref.equal(ok_step(c, sid, grads_for(i), key=f"k{i}"))
    assert log_len(redis_url, sid) == 6  # no checkpoint since the create
    x.kill()
    y = make_server(checkpoint_steps=1000)
    with httpx.Client(base_url=y.url, timeout=30) as c:
        # The last acknowledged step's retry replays (not applied twice) ...
        assert ref.equal(ok_step(c, sid, grads_for(5), key="k5", replayed=True))
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 6
        # ... and the session goes on from exactly where it was.
        ref.step(grads_for(6))
        assert ref.equal(ok_step(c, sid, grads_for(6), key="k6"))
        assert ref.state_equal(exported(c, sid))


def test_redis_sigkill_with_appendfsync_always(make_server, tmp_path) -> None:
    from optserve.store.embedded import EmbeddedRedis

    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendfsync="always")
    server.start()
    try:
        x = make_server(redis_url=server.url, checkpoint_steps=2)
        ref = Ref(seed=2)
        with httpx.Client(base_url=x.url, timeout=30) as c:
            sid = new_session(c, ref)
            for i in range(7):
                ref.step(grads_for(i))
                assert ref.equal(ok_step(c, sid, grads_for(i), key=f"k{i}"))
        x.stop()
        assert server.process is not None
        server.process.kill()  # SIGKILL: only what the AOF holds survives
        server.process.wait()
        server.start()
        y = make_server(redis_url=server.url, checkpoint_steps=2)
        with httpx.Client(base_url=y.url, timeout=30) as c:
            assert c.get(f"/v1/sessions/{sid}").json()["version"] == 7
            assert ref.equal(params(c, sid))
            assert ref.equal(ok_step(c, sid, grads_for(6), key="k6", replayed=True))
            ref.step(grads_for(7))
            assert ref.equal(ok_step(c, sid, grads_for(7), key="k7"))
            assert ref.state_equal(exported(c, sid))
    finally:
        server.stop()


def test_cold_process_serves_step_and_get_bitwise(make_server) -> None:
    x, y = make_server(checkpoint_steps=4), make_server(checkpoint_steps=4)
    ref = Ref(seed=3)
    with httpx.Client(base_url=x.url, timeout=30) as cx, \
            httpx.Client(base_url=y.url, timeout=30) as cy:
        sid = new_session(cx, ref)
        for i in range(7):  # X holds the session hot; the log is not empty
            ref.step(grads_for(i))
            ok_step(cx, sid, grads_for(i))
        hot = params(cx, sid)
        cold = params(cy, sid)
        assert ref.equal(hot) and all(torch.equal(hot[n], cold[n]) for n in hot)
        ref.step(grads_for(7))
        assert ref.equal(ok_step(cy, sid, grads_for(7)))  # Y rebuilt it by replay
        ref.step(grads_for(8))
        assert ref.equal(ok_step(cx, sid, grads_for(8)))  # X's copy was stale: replayed
        assert ref.state_equal(exported(cy, sid))


def test_two_processes_alternate_bitwise(make_server) -> None:
    x, y = make_server(checkpoint_steps=3), make_server(checkpoint_steps=3)
    ref = Ref(seed=4)
    with httpx.Client(base_url=x.url, timeout=30) as cx, \
            httpx.Client(base_url=y.url, timeout=30) as cy:
        sid = new_session(cx, ref)
        for i in range(12):
            ref.step(grads_for(i))
            assert ref.equal(ok_step((cx, cy)[i % 2], sid, grads_for(i)))
        # bf16 gradients: logged as bf16 bytes, replayed as the live step converted them.
        alone, mixed = new_session(cx, Ref(seed=5)), new_session(cx, Ref(seed=5))
        for i in range(9):
            g = {n: t.to(torch.bfloat16) for n, t in grads_for(i).items()}
            hot = ok_step(cx, alone, g)
            got = ok_step((cx, cy)[i % 2], mixed, g)
            assert all(torch.equal(hot[n], got[n]) for n in hot)
        a, m = exported(cx, alone), exported(cy, mixed)
        assert all(torch.equal(a[n], m[n]) for n in a)


def test_sync_round_replays_bitwise(make_server) -> None:
    import threading

    x, y = make_server(checkpoint_steps=2), make_server()
    with httpx.Client(base_url=x.url, timeout=60) as c:
        sid = create(c, {"w": torch.zeros(6)}, mode="sync",
                     sync={"contributions": 2, "timeout_s": 30},
                     hyperparams={"lr": 0.01, "momentum": 0.9})["id"]
    w = torch.zeros(6, requires_grad=True)
    opt = torch.optim.RMSprop([w], lr=0.01, momentum=0.9)
    last: list[httpx.Response] = []
    for r in range(5):
        gs = [torch.randn(6, generator=torch.Generator().manual_seed(10 * r + k))
              for k in range(2)]
        out: list[httpx.Response] = []

        def push(g: torch.Tensor, url: str, out: list[httpx.Response] = out) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                out.append(step(c, sid, {"w": g}))

        threads = [threading.Thread(target=push, args=(g, x.url)) for g in gs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [o.status_code for o in out] == [200, 200], [o.text for o in out]
        w.grad = ((gs[0].double() + gs[1].double()) / 2).float()
        opt.step()
        last = out
    with httpx.Client(base_url=y.url, timeout=60) as c:  # y never saw the session
        cold = params(c, sid)["w"]
    assert torch.equal(cold, w.detach())
    assert torch.equal(decode(last[0])["w"], cold)


def test_put_and_patch_between_logged_steps(make_server) -> None:
    x, y = make_server(checkpoint_steps=100), make_server(checkpoint_steps=100)
    ref = Ref(seed=6)
    with httpx.Client(base_url=x.url, timeout=30) as cx, \
            httpx.Client(base_url=y.url, timeout=30) as cy:
        sid = new_session(cx, ref)
        i = 0

        def steps(n: int) -> None:
            nonlocal i
            for _ in range(n):
                ref.step(grads_for(i))
                assert ref.equal(ok_step(cx, sid, grads_for(i)))
                i += 1

        steps(3)
        r = cy.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.05}})
        assert r.status_code == 200, r.text
        ref.opt.param_groups[0]["lr"] = 0.05
        steps(2)
        new = {"w": torch.full((5, 3), 0.25), "b": torch.full((4,), -1.0)}
        r = cy.put(f"/v1/sessions/{sid}/params", content=st_body(new),
                   headers={"content-type": ST, "if-match": '"5"'})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            for n, p in ref.params.items():
                p.copy_(new[n])
        assert ref.equal(params(cx, sid))
        steps(3)
        state = exported(cy, sid)
        assert ref.state_equal(state)
        r = cy.put(f"/v1/sessions/{sid}/state", content=wire.encode_safetensors(state),
                   headers={"content-type": ST, "if-match": '"9"'})
        assert r.status_code == 200, r.text
        steps(2)
        assert ref.state_equal(exported(cy, sid))


def test_session_stored_before_the_log_is_upgraded(make_server, redis_url: str) -> None:
    """A session an earlier optserve stored (every tensor in the head hash, no checkpoint)
    reads and steps as before; its first step writes the checkpoint and moves it out."""
    x = make_server()
    ref = Ref(seed=7)
    r = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=x.url, timeout=30) as c:
        sid = new_session(c, ref)
        ref.step(grads_for(0))
        ok_step(c, sid, grads_for(0))
        state = exported(c, sid)
        old = {f"p.{n}": state[f"param.{n}"] for n in SHAPES}
        old |= {f"s.{n[len('state.'):]}": t for n, t in state.items() if n.startswith("state.")}
        r.delete(keys.checkpoint(sid), keys.wal(sid), keys.wal_index(sid))
        r.hset(keys.tensors(sid), mapping={f: t.numpy().tobytes() for f, t in old.items()})
        x.stop()
    y = make_server()
    with httpx.Client(base_url=y.url, timeout=30) as c:
        assert ref.equal(params(c, sid))
        assert ref.state_equal(exported(c, sid))
        ref.step(grads_for(1))
        assert ref.equal(ok_step(c, sid, grads_for(1)))
        assert int(r.hget(keys.checkpoint(sid), keys.CKPT_VERSION)) == 2
        assert not [f for f in r.hkeys(keys.tensors(sid)) if f.startswith((b"p.", b"s."))]
        ref.step(grads_for(2))
        assert ref.equal(ok_step(c, sid, grads_for(2)))


def test_replica_of_another_kernel_refuses_to_replay_until_a_checkpoint(make_server) -> None:
    """The log records the device type and kernel that made each step: a process that would
    not reproduce those bits refuses (retryable) rather than serve other bits; a checkpoint
    (here an empty PATCH from the logging process) makes the session servable there."""
    x, y = make_server(checkpoint_steps=100), make_server(kernel="compiled")
    ref = Ref(seed=8)
    with httpx.Client(base_url=x.url, timeout=60) as cx, \
            httpx.Client(base_url=y.url, timeout=60) as cy:
        sid = new_session(cx, ref)
        for i in range(2):
            ref.step(grads_for(i))
            ok_step(cx, sid, grads_for(i))
        r = step(cy, sid, grads_for(2))
        assert r.status_code == 503 and r.json()["code"] == "session_busy", r.text
        assert cx.patch(f"/v1/sessions/{sid}", json={}).status_code == 200
        assert ref.equal(params(cy, sid))  # the checkpoint: nothing left to replay
        assert step(cy, sid, grads_for(2)).status_code == 200
