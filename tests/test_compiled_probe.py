"""A compiled kernel that cannot compile is found at start-up, in the background, never by
a user's first step: the service logs why and every step takes the exact path at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from optserve.optim import fused

from conftest import start_thread_server
from helpers import create, decode, step


@pytest.fixture
def broken_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fused.reset()

    def fail(*_: object) -> None:
        raise RuntimeError("no C++ compiler found (simulated)")

    monkeypatch.setattr(fused, "_build", fail)
    yield
    fused.reset()


def test_start_up_probe_finds_a_broken_compiler(broken_compiler: None, redis_url: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="optserve")
    srv = start_thread_server(redis_url=redis_url, kernel="compiled")
    try:
        deadline = time.monotonic() + 30
        while "cpu" not in fused._UNAVAILABLE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "simulated" in fused._UNAVAILABLE["cpu"]  # found before any step was sent
        assert any("torch.compile does not work" in r.getMessage() for r in caplog.records)
        before = fused.calls
        w = torch.linspace(-1, 1, 100_000)  # large enough for the compiled kernel
        g = torch.linspace(0.5, -0.5, 100_000)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            sid = create(c, optimizer="rmsprop")["id"]
            r = c.put(f"/v1/sessions/{sid}/params", content=_st({"w": w}),
                      headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            t0 = time.monotonic()
            got = decode(step(c, sid, {"w": g}))["w"]
            assert time.monotonic() - t0 < 10  # no compile attempt on the user's step
        p = torch.nn.Parameter(w.clone())
        opt = torch.optim.RMSprop([p])
        p.grad = g.clone()
        opt.step()
        assert torch.equal(got, p.detach())  # the exact path: bitwise torch
        assert fused.calls == before
    finally:
        srv.stop()


def _st(tensors: dict[str, torch.Tensor]) -> bytes:
    from optserve_client import wire

    return wire.encode_safetensors(tensors)
