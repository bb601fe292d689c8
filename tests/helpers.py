"""Small helpers for talking raw HTTP to the service in tests (the SDK has its own tests)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import torch

from optserve_client import wire

ST = wire.SAFETENSORS_TYPE
JS = wire.JSON_TYPE


def jt(values: Any, dtype: str = "float32") -> dict[str, Any]:
    """One tensor in the JSON wire format."""
    arr = np.asarray(values, dtype=np.float64)
    return {"dtype": dtype, "shape": list(arr.shape), "data": arr.reshape(-1).tolist()}


def st_body(tensors: dict[str, torch.Tensor]) -> bytes:
    return wire.encode_safetensors(tensors)


def decode(resp: httpx.Response) -> dict[str, torch.Tensor]:
    tensors, _ = wire.decode(resp.content, resp.headers["content-type"])
    return {n: wire.to_torch(t, copy=True) for n, t in tensors.items()}


def create(client: httpx.Client, params: dict[str, torch.Tensor] | None = None,
           **body: Any) -> dict[str, Any]:
    if params is not None:
        body["params"] = {
            n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": t.reshape(-1).tolist()}
            for n, t in params.items()
        }
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def step(client: httpx.Client, sid: str, grads: dict[str, torch.Tensor],
         headers: dict[str, str] | None = None, **params: Any) -> httpx.Response:
    return client.post(f"/v1/sessions/{sid}/step", content=st_body(grads),
                       headers={"content-type": ST, **(headers or {})}, params=params)


def snapshot(client: httpx.Client, sid: str) -> tuple[int | None, bytes]:
    """Version and the whole exported state: compared before/after a rejected request."""
    doc = client.get(f"/v1/sessions/{sid}").json()
    r = client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    tensors, meta = wire.decode_safetensors(r.content)
    info = json.loads(meta["optserve"])  # type: ignore[index]
    return doc["version"], json.dumps(
        {n: wire.to_numpy(t).tolist() for n, t in sorted(tensors.items())}
        | {"__info": [info["hyperparams"], info["optimizer"], info["version"]]}
    ).encode()


def torch_step(ps: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
               grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One step of `torch.optim` itself with these gradients; the new parameters."""
    for n, p in ps.items():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach().clone() for n, p in ps.items()}
