"""Concurrency across server processes, crashes, Redis outages, the fused and CUDA paths."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from optserve.store.embedded import EmbeddedRedis
from optserve_client import wire

from conftest import start_thread_server
from helpers import create, decode, snapshot, step


@pytest.mark.slow
def test_concurrent_steps_through_two_processes(make_server) -> None:
    a, b = make_server(), make_server()
    with httpx.Client(base_url=a.url, timeout=60) as c:
        s = create(c, {"w": torch.zeros(8)}, optimizer="sgd", hyperparams={"lr": 1.0})
    sid = s["id"]
    replays: list[tuple[str, str]] = []

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            for i in range(25):
                url = (a.url, b.url)[(k + i) % 2]
                key = f"w{k}-s{i}"
                r = c.post(f"{url}/v1/sessions/{sid}/step",
                           content=wire.encode_safetensors({"w": torch.ones(8)}),
                           headers={"content-type": wire.SAFETENSORS_TYPE,
                                    "idempotency-key": key}, params={"return": "none"})
                assert r.status_code == 200, r.text
                if i % 5 == 0:
                    replays.append((key, r.headers["x-optserve-version"]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    with httpx.Client(base_url=b.url, timeout=60) as c:
        # Replays from the other process: the first outcome, nothing applied again.
        for key, version in replays:
            r = step(c, sid, {"w": torch.ones(8)}, {"idempotency-key": key})
            assert r.status_code == 200 and r.headers["x-optserve-version"] == version
        doc = c.get(f"/v1/sessions/{sid}").json()
        assert doc["version"] == 200
        w = decode(c.get(f"/v1/sessions/{sid}/params"))["w"]
        assert torch.equal(w, torch.full((8,), -200.0))  # none lost, none twice


def _consistent(c: httpx.Client, sid: str) -> int:
    """Every tensor at one version: params equal a local run of `version` steps, step counts too."""
    r = c.get(f"/v1/sessions/{sid}/state")
    tensors, _ = wire.decode_safetensors(r.content)
    version = int(r.headers["x-optserve-version"])
    p = {n: torch.zeros(1000, requires_grad=True) for n in ("a", "b")}
    opt = torch.optim.RMSprop(list(p.values()), lr=0.01)
    for _ in range(version):
        for t in p.values():
            t.grad = torch.ones(1000)
        opt.step()
    for n in ("a", "b"):
        assert float(wire.to_numpy(tensors[f"state.{n}.step"])) == version
        assert torch.equal(wire.to_torch(tensors[f"param.{n}"]), p[n].detach())
    return version


@pytest.mark.slow
def test_sigkill_mid_stream_leaves_one_version(make_server) -> None:
    a = make_server(lock_timeout_s=2)
    b = make_server(lock_timeout_s=2)
    with httpx.Client(base_url=b.url, timeout=60) as c:
        s = create(c, {"a": torch.zeros(1000), "b": torch.zeros(1000)})
    sid = s["id"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        with httpx.Client(base_url=a.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    step(c, sid, {"a": torch.ones(1000), "b": torch.ones(1000)})
                except httpx.HTTPError:
                    return
                except BaseException as exc:  # pragma: no cover - surfaced below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    # Kill mid-stream once steps are landing (a loaded machine may take a while to start).
    with httpx.Client(base_url=b.url, timeout=60) as c:
        deadline = time.monotonic() + 30
        while (c.get(f"/v1/sessions/{sid}").json()["version"] or 0) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.2)
    a.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    with httpx.Client(base_url=b.url, timeout=60) as c:
        v = _consistent(c, sid)
        assert v > 0
        r = step(c, sid, {"a": torch.ones(1000), "b": torch.ones(1000)})
        assert r.status_code == 200, r.text
        assert _consistent(c, sid) == v + 1


@pytest.mark.slow
def test_redis_outage_gives_503_then_recovers(tmp_path) -> None:
    redis = EmbeddedRedis(data_dir=tmp_path, appendfsync="always")
    redis.start()
    srv = start_thread_server(redis_url=redis.url, kernel="exact", redis_timeout_s=1.0)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            s = create(c, {"w": torch.zeros(2)})
            assert step(c, s["id"], {"w": torch.ones(2)}).status_code == 200
            redis.stop()
            r = c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"]
            r = step(c, s["id"], {"w": torch.ones(2)})
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "store_unavailable" and "retry-after" in r.headers
            redis.restart()
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.get("/readyz").status_code == 200
            r = step(c, s["id"], {"w": torch.ones(2)})
            assert r.status_code == 200, r.text
            assert r.headers["x-optserve-version"] == "2"  # the first step survived (AOF)
    finally:
        srv.stop()
        redis.stop()


def test_fused_path_matches_torch(fused_server: str) -> None:
    torch.manual_seed(1)
    n = 100_000  # above the compiled kernel's minimum size, so the compiled kernel runs
    w0 = torch.randn(n)
    hp = {"lr": 0.01, "alpha": 0.9, "momentum": 0.9, "centered": True}
    with httpx.Client(base_url=fused_server, timeout=120) as c:
        s = create(c, {"w": w0}, hyperparams=hp)
        local = w0.clone().requires_grad_(True)
        opt = torch.optim.RMSprop([local], **hp)
        for _ in range(20):
            g = torch.randn(n) * 10
            local.grad = g.clone()
            opt.step()
            r = step(c, s["id"], {"w": g})
            assert r.status_code == 200, r.text
        torch.testing.assert_close(decode(r)["w"], local.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(decode(r)["w"], w0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(redis_url: str) -> None:
    srv = start_thread_server(redis_url=redis_url, device="cuda", kernel="exact")
    try:
        torch.manual_seed(2)
        w0 = torch.randn(4096)
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            s = create(c, {"w": w0})
            local = w0.clone().cuda().requires_grad_(True)
            opt = torch.optim.RMSprop([local], lr=0.01)
            for _ in range(10):
                g = torch.randn(4096)
                local.grad = g.cuda()
                opt.step()
                r = step(c, s["id"], {"w": g})
            torch.testing.assert_close(decode(r)["w"], local.detach().cpu(), rtol=1e-6,
                                       atol=1e-7)
            before = snapshot(c, s["id"])
            assert before[0] == 10
    finally:
        srv.stop()
