"""What the clients put on the wire, checked with a recording transport (no server)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

import optserve_client as oc
from optserve_client import wire

DOC = {"id": "s/1", "name": None, "optimizer": "rmsprop", "hyperparams": {"lr": 0.01},
       "mode": "async", "max_staleness": None, "sync": None, "version": 0,
       "tensors": {"w": {"dtype": "float32", "shape": [2]}}, "created_at": "t",
       "updated_at": "t"}


class Recorder:
    """Answers every request with a plausible response for its path."""

    def __init__(self) -> None:
        self.requests: list[oc.RawRequest] = []

    def send(self, request: oc.RawRequest, timeout: oc.Timeout) -> oc.RawResponse:
        if isinstance(request.body, list):  # sent part by part; joined here to inspect
            assert int(request.headers["Content-Length"]) == sum(map(len, request.body))
            request.body = b"".join(request.body)
        self.requests.append(request)
        if request.url.split("?")[0].endswith(("/step", "/params")) and request.method in (
                "POST", "GET"):
            ctype = request.headers.get("Accept", wire.SAFETENSORS_TYPE)
            body = b"" if "return=none" in request.url else wire.encode(
                {"w": np.array([1.0, 2.0], np.float32)}, ctype)
            return oc.RawResponse(200, {"content-type": ctype, "x-optserve-version": "5"},
                                  bytearray(body))
        status = 201 if request.method == "POST" else 200
        return oc.RawResponse(status, {"content-type": "application/json"},
                              json.dumps(DOC).encode())

    def close(self) -> None:
        pass


def make(**kw: Any) -> tuple[oc.Client, Recorder]:
    rec = Recorder()
    return oc.Client("http://h:1", transport=rec, **kw), rec


def test_base_url_and_key_from_args_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPTSERVE_URL", raising=False)
    monkeypatch.delenv("OPTSERVE_API_KEY", raising=False)
    c = oc.Client(transport=Recorder())
    assert c.base_url == oc.DEFAULT_BASE_URL and c.api_key is None
    monkeypatch.setenv("OPTSERVE_URL", "http://env:9/")
    monkeypatch.setenv("OPTSERVE_API_KEY", "k-env")
    c = oc.Client(transport=Recorder())
    assert (c.base_url, c.api_key) == ("http://env:9", "k-env")
    c = oc.Client("arg:7", "k-arg", transport=Recorder())
    assert (c.base_url, c.api_key) == ("http://arg:7", "k-arg")


def test_auth_and_user_agent_headers() -> None:
    c, rec = make(api_key="secret")
    c.get_session("abc")
    h = rec.requests[0].headers
    assert h["Authorization"] == "Bearer secret"
    assert h["User-Agent"].startswith("optserve-python/")
    assert rec.requests[0].url == "http://h:1/v1/sessions/abc"
    c.get_session("a/b c")  # ids are path-escaped
    assert rec.requests[1].url == "http://h:1/v1/sessions/a%2Fb%20c"


def test_step_headers_and_query() -> None:
    c, rec = make()
    res = c.step("s", {"w": np.ones(2, np.float32), "skipped": None}, base_version=4,
                 weight=32, if_match=4, return_params=False)
    r = rec.requests[0]
    assert r.method == "POST" and r.url == "http://h:1/v1/sessions/s/step?return=none"
    assert r.headers["X-Optserve-Base-Version"] == "4"
    assert r.headers["X-Optserve-Weight"] == "32.0"
    assert r.headers["If-Match"] == '"4"'
    assert r.headers["Content-Type"] == r.headers["Accept"] == wire.SAFETENSORS_TYPE
    tensors, _ = wire.decode(r.body, wire.SAFETENSORS_TYPE)  # type: ignore[arg-type]
    assert list(tensors) == ["w"]  # a None gradient is left out
    assert res.version == 5 and res.params is None
    with pytest.raises(ValueError):
        c.step("s", {"w": np.ones(2)}, weight=0)


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
def test_grad_compression(grad_dtype: str) -> None:
    c, rec = make()
    g = np.array([1.0, -2.5, 3.0e-3], np.float32)
    c.step("s", {"w": g}, grad_dtype=grad_dtype)
    c.step("s", {"w": torch.from_numpy(g)}, grad_dtype=grad_dtype)
    for r in rec.requests:
        tensors, _ = wire.decode(r.body, wire.SAFETENSORS_TYPE)  # type: ignore[arg-type]
        t = tensors["w"]
        assert t.dtype == grad_dtype and len(t.data) == 2 * g.size
        want = torch.from_numpy(g).to(getattr(torch, grad_dtype)).float().numpy()
        np.testing.assert_array_equal(wire.to_numpy(t).astype(np.float32), want)
    with pytest.raises(ValueError):
        c.step("s", {"w": g}, grad_dtype="int8")


def test_returned_arrays_follow_the_input_kind() -> None:
    c, _ = make()
    res = c.step("s", {"w": np.ones(2, np.float32)})
    assert isinstance(res.params["w"], np.ndarray) and res.params["w"].flags.writeable
    res = c.step("s", {"w": torch.ones(2)})
    assert isinstance(res.params["w"], torch.Tensor)
    res = c.step("s", {"w": torch.ones(2)}, as_="numpy")
    assert isinstance(res.params["w"], np.ndarray)
    params, version = c.get_params("s", as_="torch")
    assert version == 5 and torch.equal(params["w"], torch.tensor([1.0, 2.0]))


def test_json_format() -> None:
    c, rec = make(format="json")
    res = c.step("s", {"w": np.array([0.5, 1.5], np.float32)})
    r = rec.requests[0]
    assert r.headers["Content-Type"] == "application/json"
    assert json.loads(r.body)["tensors"]["w"] == {"dtype": "float32", "shape": [2],
                                                  "data": [0.5, 1.5]}
    np.testing.assert_array_equal(res.params["w"], [1.0, 2.0])
    assert c.with_options(format="safetensors").format == "safetensors"
    assert c.format == "json"
    with pytest.raises(ValueError):
        oc.Client("http://h", format="xml", transport=Recorder())


def test_create_session_inline_or_put() -> None:
    c, rec = make()
    s = c.create_session("rmsprop", {"lr": 0.1}, {"w": np.ones(2, np.float32)}, name="run",
                         max_staleness=2, preset="standard")
    assert len(rec.requests) == 1
    body = json.loads(rec.requests[0].body)
    assert body == {"optimizer": "rmsprop", "mode": "async", "hyperparams": {"lr": 0.1},
                    "preset": "standard",
                    "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 1.0]}},
                    "max_staleness": 2, "name": "run"}
    assert s.id == "s/1" and s["tensors"] == DOC["tensors"] and s.get("nope") is None
    c, rec = make()
    c.create_session(params={"w": np.ones(1 << 17, np.float32)})  # 512 KiB: binary PUT
    assert [r.method for r in rec.requests] == ["POST", "PUT"]
    assert "params" not in json.loads(rec.requests[0].body)
    assert rec.requests[1].url.endswith("/v1/sessions/s%2F1/params")
    assert rec.requests[1].headers["Content-Type"] == wire.SAFETENSORS_TYPE
    assert "If-Match" not in rec.requests[1].headers


def test_update_and_state_requests() -> None:
    c, rec = make()
    c.update_session("s", hyperparams={"lr": 0.5}, name="x")
    assert json.loads(rec.requests[0].body) == {"name": "x", "hyperparams": {"lr": 0.5}}
    c.put_params("s", {"w": np.ones(2, np.float32)}, if_match='"7"')
    assert rec.requests[1].headers["If-Match"] == '"7"'
    meta = {"optimizer": "rmsprop", "hyperparams": {"lr": 0.1}, "version": 0}
    c.put_state("s", {"param.w": np.ones(2, np.float32),
                      "state.w.step": np.array(3.0, np.float32)}, meta, if_match=2)
    r = rec.requests[2]
    tensors, md = wire.decode(r.body, r.headers["Content-Type"])  # type: ignore[arg-type]
    assert json.loads(md["optserve"]) == meta  # type: ignore[index]
    assert tensors["state.w.step"].shape == ()


def test_with_options_shares_the_transport() -> None:
    c, rec = make()
    fast = c.with_options(timeout=1.5, max_retries=0)
    assert fast.timeout == oc.Timeout(1.5, 1.5) and fast._transport is rec
    assert c.timeout == oc.Timeout(10.0, 60.0)
    assert oc.Timeout.of((2, None)) == oc.Timeout(2, None)
    fast.close()  # does not close the shared transport


def test_safetensors_parts_are_the_codecs_bytes() -> None:
    from optserve_client._base import safetensors_parts

    tensors = {"big": np.arange(1 << 16, dtype=np.float32).reshape(256, 256),
               "tiny": np.ones(3, np.float64), "t": torch.arange(70_000, dtype=torch.float32),
               "bf": torch.ones(5, dtype=torch.bfloat16), "step": np.array(2.0, np.float32)}
    parts = safetensors_parts(tensors, {"optserve": "{}"})
    assert b"".join(parts) == wire.encode_safetensors(
        {**tensors, "step": torch.tensor(2.0)}, {"optserve": "{}"})
    assert any(isinstance(p, memoryview) for p in parts)  # big tensors are not copied
    assert len(parts) == 5  # header, big, tiny, t, bf+step (small ones coalesced)
