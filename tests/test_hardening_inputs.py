"""Bad inputs are 400/422 problems (never 500), the contract's gaps are closed, and the
service refuses at start-up what cannot work. Real HTTP stack, real Redis, real processes."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import torch

from optserve.store import keys
from optserve.store.embedded import free_port

from conftest import ROOT, wait_until_live
from helpers import JS, ST, create, snapshot, st_body, step

DEEP = 100_000


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=60) as c:
        yield c


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["code"] == code, doc
    return doc


def _st_raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _ids(c: httpx.Client) -> set[str]:
    return {s["id"] for s in c.get("/v1/sessions").json()["sessions"]}


def _post_step(c: httpx.Client, sid: str, body: bytes | str, kind: str,
               **headers: str) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/step", content=body,
                  headers={"content-type": kind, **headers})


def _json_tensor(name: str, dtype: str = "float32", shape: list[int] | None = None,
                 data: list[float] | None = None) -> str:
    t = {"dtype": dtype, "shape": [3] if shape is None else shape,
         "data": [0.1, 0.2, 0.3] if data is None else data}
    return json.dumps({"tensors": {name: t}})


# --------------------------------------------------------------------------- finding 5

# Each: (what is sent, expected status, expected code). `sid` is a session with params w[3]
# stepped once; `empty` is a session without params.
Send = Callable[[httpx.Client, str, str], httpx.Response]
FIVE: dict[str, tuple[Send, int, str]] = {
    "safetensors header nested 100,000 deep": (
        lambda c, sid, empty: _post_step(c, sid, _st_raw(b"[" * DEEP + b"]" * DEEP), ST),
        400, "malformed_body"),
    "JSON step body nested 100,000 deep": (
        lambda c, sid, empty: _post_step(c, sid, '{"tensors":' + "[" * DEEP + "]" * DEEP + "}",
                                         JS),
        400, "malformed_body"),
    "create body nested 100,000 deep": (
        lambda c, sid, empty: c.post("/v1/sessions", content='{"hyperparams":' + "[" * DEEP
                                     + "]" * DEEP + "}", headers={"content-type": JS}),
        400, "malformed_body"),
    "a 5,000-digit JSON integer": (
        lambda c, sid, empty: _post_step(
            c, sid, '{"tensors":{"w":{"dtype":"float32","shape":[3],"data":[1' + "0" * 5000
            + ',2,3]}}}', JS),
        400, "malformed_body"),
    "a lone surrogate as tensor name": (
        lambda c, sid, empty: _post_step(c, sid, _json_tensor("\udc80"), JS),
        422, "invalid_name"),
    "params of shape [0, 10**30] at create": (
        lambda c, sid, empty: c.post("/v1/sessions", json={"params": {"w": {
            "dtype": "float32", "shape": [0, 10**30], "data": []}}}),
        400, "malformed_body"),
    "params of shape [0, 2**64] in a first PUT": (
        lambda c, sid, empty: c.put(f"/v1/sessions/{empty}/params",
                                    content=_json_tensor("w", shape=[0, 2**64], data=[]),
                                    headers={"content-type": JS}),
        400, "malformed_body"),
    "params with 100 dimensions": (
        lambda c, sid, empty: c.put(f"/v1/sessions/{empty}/params",
                                    content=_json_tensor("w", shape=[1] * 100, data=[1.0]),
                                    headers={"content-type": JS}),
        400, "malformed_body"),
}


@pytest.mark.parametrize("case", list(FIVE))
def test_inputs_that_were_500s_are_problems(client: httpx.Client, case: str) -> None:
    send, status, code = FIVE[case]
    s = create(client, {"w": torch.tensor([1.0, 2.0, 3.0])})
    assert step(client, s["id"], {"w": torch.ones(3)}).status_code == 200
    empty = create(client)["id"]
    before, before_ids = snapshot(client, s["id"]), _ids(client)
    before_empty = client.get(f"/v1/sessions/{empty}").json()
    r = send(client, s["id"], empty)
    doc = _problem(r, status, code)
    assert len(r.content) < 4096, "a problem repeats at most a clipped piece of the input"
    assert "\udc80" not in r.text and doc["status"] == status
    assert snapshot(client, s["id"]) == before
    assert _ids(client) == before_ids  # no session made
    after_empty = client.get(f"/v1/sessions/{empty}").json()
    assert (after_empty["version"], after_empty["tensors"]) == (None, {}) == (
        before_empty["version"], before_empty["tensors"])
    assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- finding 7


def test_contract_gaps_are_closed(client: httpx.Client, live_server: str) -> None:
    s = create(client, {"w": torch.tensor([1.0, 2.0, 3.0])})
    sid = s["id"]
    assert step(client, sid, {"w": torch.ones(3)}).status_code == 200
    before = snapshot(client, sid)

    # A 20 MiB name: a 422 of its own, echoed (clipped) once, not twice in full.
    huge = "n" * (20 * 1024 * 1024)
    r = _post_step(client, sid, _json_tensor(huge), JS)
    doc = _problem(r, 422, "invalid_name")
    assert len(r.content) < 4096 and "\u2026" in doc["detail"]
    r = client.put(f"/v1/sessions/{sid}/params", content=_json_tensor("p" * 1025),
                   headers={"content-type": JS, "if-match": '"1"'})
    _problem(r, 422, "invalid_name")
    # An unknown name under the limit is echoed clipped to 200 characters.
    r = _post_step(client, sid, _json_tensor("u" * 1000), JS)
    doc = _problem(r, 422, "unknown_tensor")
    assert doc["tensors"] == ["u" * 200 + "\u2026"]

    # Duplicate names in a safetensors header are malformed.
    entry = '{"dtype":"F32","shape":[3],"data_offsets":[0,12]}'
    header = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    r = _post_step(client, sid, _st_raw(header, b"\0" * 12), ST)
    _problem(r, 400, "malformed_body")

    # A float8 gradient is well-formed but not accepted: 422 in both formats.
    r = _post_step(client, sid, _json_tensor("w", dtype="float8_e4m3fn"), JS)
    assert _problem(r, 422, "dtype_mismatch")["got"] == "float8_e4m3fn"
    r = _post_step(client, sid, st_body({"w": torch.ones(3).to(torch.float8_e4m3fn)}), ST)
    _problem(r, 422, "dtype_mismatch")

    # A step with no gradient is not a step.
    _problem(_post_step(client, sid, '{"tensors": {}}', JS), 422, "missing_tensor")
    _problem(_post_step(client, sid, st_body({}), ST), 422, "missing_tensor")
    assert snapshot(client, sid) == before

    # An Idempotency-Key replays only its own request.
    key = {"idempotency-key": "k-7"}
    first = _post_step(client, sid, st_body({"w": torch.ones(3)}), ST, **key)
    assert first.status_code == 200
    after_first = snapshot(client, sid)
    assert after_first[0] == before[0] + 1
    r = _post_step(client, sid, st_body({"w": torch.full((3,), 2.0)}), ST, **key)
    _problem(r, 422, "idempotency_key_mismatch")
    r = _post_step(client, sid, st_body({"w": torch.ones(3)}), ST,
                   **key, **{"x-optserve-base-version": "1"})
    _problem(r, 422, "idempotency_key_mismatch")
    again = _post_step(client, sid, st_body({"w": torch.ones(3)}), ST, **key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert snapshot(client, sid) == after_first
    ids = _ids(client)
    ck = {"idempotency-key": "create-7"}
    made = client.post("/v1/sessions", json={"optimizer": "sgd"}, headers=ck)
    assert made.status_code == 201
    r = client.post("/v1/sessions", json={"optimizer": "adagrad"}, headers=ck)
    _problem(r, 422, "idempotency_key_mismatch")
    replay = client.post("/v1/sessions", json={"optimizer": "sgd"}, headers=ck)
    assert replay.status_code == 201 and replay.json()["id"] == made.json()["id"]
    assert _ids(client) == ids | {made.json()["id"]}

    # 405 names the methods of every route on the path.
    r = client.post(f"/v1/sessions/{sid}", json={})
    _problem(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == {"GET", "PATCH", "DELETE"}
    r = client.delete("/v1/sessions")
    assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
    assert snapshot(client, sid) == after_first


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs() -> Iterator[_Records]:
    """What the in-process server logs, ours and uvicorn's (which does not propagate)."""
    h = _Records()
    loggers = [logging.getLogger(n) for n in ("optserve", "uvicorn.error")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
    yield h
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(h)
        lg.setLevel(level)


def _count(metrics: str, method: str, route: str, status: str) -> float:
    m = re.search(rf'optserve_requests_total\{{method="{method}",route="{re.escape(route)}",'
                  rf'status="{status}"\}} ([0-9.e+]+)', metrics)
    return float(m.group(1)) if m else 0.0


def test_disconnects_and_500s_log_once(client: httpx.Client, live_server: str,
                                       redis_url: str, server_logs: _Records) -> None:
    route = "/v1/sessions/{session_id}/params"
    s = create(client, {"w": torch.tensor([1.0, 2.0, 3.0])})
    before = snapshot(client, s["id"])
    gone0 = _count(client.get("/metrics").text, "PUT", route, "499")
    err0 = _count(client.get("/metrics").text, "PUT", route, "500")

    # A client that leaves mid-upload: one log line, no traceback, status 499 in metrics.
    url = urlsplit(live_server)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall((f"PUT /v1/sessions/{s['id']}/params HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: {ST}\r\nIf-Match: *\r\nContent-Length: 100000\r\n\r\n"
                      ).encode() + b"\0" * 1000)
    deadline = time.monotonic() + 20
    while _count(client.get("/metrics").text, "PUT", route, "499") == gone0:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    assert _count(client.get("/metrics").text, "PUT", route, "500") == err0
    gone = [r for r in server_logs.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    assert not any(r.exc_info for r in server_logs.records)
    assert snapshot(client, s["id"]) == before

    # A 500 (a session document Redis holds but cannot be read): one traceback, not two.
    broken = create(client)["id"]
    r0 = redis.Redis.from_url(redis_url)
    r0.set(keys.meta(broken), b"{not json")
    r = client.get(f"/v1/sessions/{broken}")
    _problem(r, 500, "internal_error")
    time.sleep(0.5)
    tracebacks = [r for r in server_logs.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    r0.delete(keys.meta(broken))
    r0.close()


# --------------------------------------------------------------------------- finding 9


def _env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update(OPTSERVE_REDIS_URL=redis_url, OPTSERVE_FUSED="off", OPTSERVE_LOG_LEVEL="warning")
    env.update({f"OPTSERVE_{k.upper()}": v for k, v in settings.items()})
    return env


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optserve.cli", "serve", "--port",
                           str(free_port())], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _uvicorn(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uvicorn", "optserve.app:app_factory",
                           "--factory", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _placeholder_keys() -> str:
    for line in (ROOT / "deploy" / ".env.example").read_text().splitlines():
        if line.startswith("OPTSERVE_API_KEYS="):
            return line.partition("=")[2]
    raise AssertionError("deploy/.env.example has no OPTSERVE_API_KEYS")


@pytest.mark.slow
def test_start_up_refuses_what_cannot_work(redis_url: str) -> None:
    # An invalid value names its environment variable.
    bad_port = _env(redis_url, port="eighty")
    for run in (_serve, _uvicorn):
        done = run(bad_port)
        assert done.returncode != 0
        assert "OPTSERVE_PORT: Input should be a valid integer" in done.stderr, done.stderr
    # deploy/.env.example's keys, as shipped.
    keys_env = _env(redis_url, api_keys=_placeholder_keys())
    for run in (_serve, _uvicorn):
        done = run(keys_env)
        assert done.returncode != 0
        assert "OPTSERVE_API_KEYS" in done.stderr and "change-me" in done.stderr, done.stderr
    # CUDA asked for where there is none: refused, not healthy-then-500.
    if not torch.cuda.is_available():
        cuda = _env(redis_url, device="cuda")
        for run in (_serve, _uvicorn):
            done = run(cuda)
            assert done.returncode != 0
            assert "OPTSERVE_DEVICE=cuda" in done.stderr, done.stderr
    # And the same settings, fixed, start.
    ok = subprocess.Popen([sys.executable, "-m", "uvicorn", "optserve.app:app_factory",
                           "--factory", "--port", str(port := free_port())],
                          env=_env(redis_url, api_keys="team-a:k7Qx2m"), cwd=ROOT,
                          stderr=subprocess.DEVNULL)
    try:
        wait_until_live(f"http://127.0.0.1:{port}", proc=ok)
    finally:
        ok.terminate()
        ok.wait(timeout=30)
