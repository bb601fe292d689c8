"""A change made through one server process is seen by a step in another (hardening #1).

Process X steps the session (and keeps its tensors hot in its cache); process Y changes
something a step reads; X steps again. X's result must equal torch's for the changed
session, never the stale cached one.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from optserve_client import wire

from helpers import create, decode, st_body, step

pytestmark = pytest.mark.slow


def _sgd(w0: float = 1.0) -> tuple[torch.nn.Parameter, torch.optim.SGD]:
    p = torch.nn.Parameter(torch.tensor([w0]))
    return p, torch.optim.SGD([p], lr=0.1, momentum=0.9)


def _torch_step(p: torch.nn.Parameter, opt: torch.optim.Optimizer, g: float = 1.0) -> float:
    p.grad = torch.tensor([g])
    opt.step()
    return float(p.detach()[0])


def _state(c: httpx.Client, sid: str) -> dict[str, torch.Tensor]:
    r = c.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    tensors, _ = wire.decode_safetensors(r.content)
    return {n: wire.to_torch(t, copy=True) for n, t in tensors.items()}


@pytest.fixture
def two(make_server):
    x, y = make_server(), make_server()
    with httpx.Client(base_url=x.url, timeout=30) as cx, \
            httpx.Client(base_url=y.url, timeout=30) as cy:
        yield cx, cy


def _session(cx: httpx.Client) -> str:
    doc = create(cx, {"w": torch.tensor([1.0])}, optimizer="sgd",
                 hyperparams={"lr": 0.1, "momentum": 0.9})
    return doc["id"]


def _w(resp: httpx.Response) -> float:
    assert resp.status_code == 200, resp.text
    return float(decode(resp)["w"][0])


def test_patch_momentum_off_and_on_in_another_process(two) -> None:
    cx, cy = two
    sid = _session(cx)
    g = {"w": torch.tensor([1.0])}
    _w(step(cx, sid, g))  # X now holds w and its momentum buffer hot
    for m in (0.0, 0.9):
        r = cy.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"momentum": m}})
        assert r.status_code == 200, r.text
    w = _w(step(cx, sid, g))
    p, opt = _sgd()
    _torch_step(p, opt)
    opt.state[p].pop("momentum_buffer")  # what optserve's momentum off/on does
    assert w == _torch_step(p, opt)  # 0.8, not the stale buffer's 0.71
    assert float(_state(cy, sid)["state.w.momentum_buffer"][0]) == 1.0


def test_patch_lr_in_another_process(two) -> None:
    cx, cy = two
    sid = _session(cx)
    g = {"w": torch.tensor([1.0])}
    _w(step(cx, sid, g))
    assert cy.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.5}}).status_code == 200
    w = _w(step(cx, sid, g))
    p, opt = _sgd()
    _torch_step(p, opt)
    opt.param_groups[0]["lr"] = 0.5
    assert w == _torch_step(p, opt)


def test_put_params_in_another_process(two) -> None:
    cx, cy = two
    sid = _session(cx)
    g = {"w": torch.tensor([1.0])}
    _w(step(cx, sid, g))
    r = cy.put(f"/v1/sessions/{sid}/params", content=st_body({"w": torch.tensor([5.0])}),
               headers={"content-type": wire.SAFETENSORS_TYPE, "if-match": '"1"'})
    assert r.status_code == 200, r.text
    w = _w(step(cx, sid, g))
    p, opt = _sgd()  # the momentum buffer survives a params replace; the params are new
    _torch_step(p, opt)
    with torch.no_grad():
        p.copy_(torch.tensor([5.0]))
    assert w == _torch_step(p, opt)


def test_put_state_in_another_process(two) -> None:
    cx, cy = two
    sid = _session(cx)
    g = {"w": torch.tensor([1.0])}
    _w(step(cx, sid, g))
    exported = _state(cy, sid)
    exported["state.w.momentum_buffer"] = torch.tensor([3.0])
    exported["param.w"] = torch.tensor([2.0])
    r = cy.put(f"/v1/sessions/{sid}/state", content=wire.encode_safetensors(exported),
               headers={"content-type": wire.SAFETENSORS_TYPE, "if-match": '"1"'})
    assert r.status_code == 200, r.text
    w = _w(step(cx, sid, g))
    p, opt = _sgd(2.0)
    opt.state[p]["momentum_buffer"] = torch.tensor([3.0])
    assert w == _torch_step(p, opt)
