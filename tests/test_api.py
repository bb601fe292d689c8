"""The HTTP contract (API.md): every endpoint, every error row, and nothing changed on error."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch

from optserve_client import wire

from helpers import JS, ST, create, decode, jt, snapshot, st_body, step


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=30) as c:
        yield c


@pytest.fixture
def session(client: httpx.Client) -> dict:
    return create(client, {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(0.5)},
                  hyperparams={"lr": 0.01}, name="t")


def grads(w: list[float] | None = None, b: float | None = 0.1) -> dict[str, torch.Tensor]:
    out = {"w": torch.tensor(w or [0.1, -0.2, 0.3])}
    if b is not None:
        out["b"] = torch.tensor(b)
    return out


# --------------------------------------------------------------------------- happy paths


def test_create_get_list_patch_delete(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    assert session["version"] == 0
    assert session["hyperparams"] == {"lr": 0.01, "alpha": 0.99, "eps": 1e-8,
                                      "weight_decay": 0.0, "momentum": 0.0, "centered": False,
                                      "maximize": False}
    assert session["tensors"] == {"w": {"dtype": "float32", "shape": [3]},
                                  "b": {"dtype": "float32", "shape": []}}
    assert len(sid) >= 22  # unguessable
    got = client.get(f"/v1/sessions/{sid}")
    assert got.status_code == 200 and got.json()["id"] == sid
    assert got.headers["etag"] == '"0"'
    ids = [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]
    assert sid in ids
    r = client.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.001}})
    assert r.status_code == 200, r.text
    assert r.json()["hyperparams"]["lr"] == 0.001 and r.json()["version"] == 0
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.get(f"/v1/sessions/{sid}").status_code == 404
    assert sid not in [s["id"] for s in client.get("/v1/sessions").json()["sessions"]]


def test_create_with_idempotency_key_makes_one_session(client: httpx.Client) -> None:
    n = len(client.get("/v1/sessions").json()["sessions"])
    body = {"params": {"w": jt([1.0])}, "name": "once"}
    first = client.post("/v1/sessions", json=body, headers={"idempotency-key": "create-1"})
    again = client.post("/v1/sessions", json=body, headers={"idempotency-key": "create-1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(client.get("/v1/sessions").json()["sessions"]) == n + 1
    client.delete(f"/v1/sessions/{first.json()['id']}")
    gone = client.post("/v1/sessions", json=body, headers={"idempotency-key": "create-1"})
    assert gone.status_code == 409 and gone.json()["code"] == "idempotency_key_reused"
    assert len(client.get("/v1/sessions").json()["sessions"]) == n


def test_create_location_header(client: httpx.Client) -> None:
    r = client.post("/v1/sessions", json={"params": {"w": jt([1.0])}})
    assert r.status_code == 201
    assert r.headers["location"] == f"/v1/sessions/{r.json()['id']}"


def test_step_matches_torch_in_both_formats(client: httpx.Client) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(4, 3)
    hp = {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 0.1}
    s = create(client, {"w": w0}, hyperparams=hp)
    local = w0.clone().requires_grad_(True)
    opt = torch.optim.RMSprop([local], **hp)
    for i in range(10):
        g = torch.randn(4, 3) * 10 ** (i % 3)
        local.grad = g.clone()
        opt.step()
        if i % 2:
            r = step(client, s["id"], {"w": g})
            assert r.headers["content-type"] == ST
        else:
            r = client.post(f"/v1/sessions/{s['id']}/step",
                            json={"tensors": {"w": jt(g.tolist())}})
            assert r.headers["content-type"].startswith(JS)
        assert r.status_code == 200, r.text
        assert r.headers["x-optserve-version"] == str(i + 1)
        assert r.headers["etag"] == f'"{i + 1}"'
        assert torch.equal(decode(r)["w"], local.detach())


def test_params_get_put_and_state_round_trip(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    step(client, sid, grads())
    r = client.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200 and r.headers["content-type"] == ST
    assert r.headers["etag"] == '"1"'
    rj = client.get(f"/v1/sessions/{sid}/params", headers={"accept": JS})
    assert rj.headers["content-type"].startswith(JS)
    assert torch.equal(decode(r)["w"], decode(rj)["w"])
    new = {"w": torch.tensor([5.0, 6.0, 7.0]), "b": torch.tensor(1.0)}
    put = client.put(f"/v1/sessions/{sid}/params", content=st_body(new),
                     headers={"content-type": ST, "if-match": '"1"'})
    assert put.status_code == 200, put.text
    assert put.json()["version"] == 2
    assert torch.equal(decode(client.get(f"/v1/sessions/{sid}/params"))["w"], new["w"])
    # The state survives a params PUT (step counts stay).
    state = client.get(f"/v1/sessions/{sid}/state")
    tensors, meta = wire.decode_safetensors(state.content)
    assert set(tensors) == {"param.w", "param.b", "state.w.step", "state.w.square_avg",
                            "state.b.step", "state.b.square_avg"}
    assert float(wire.to_numpy(tensors["state.w.step"])) == 1.0
    info = json.loads(meta["optserve"])
    assert info["optimizer"] == "rmsprop" and info["version"] == 2
    # Import it into a fresh session: the same state, version 0.
    other = client.post("/v1/sessions", json={}).json()
    imp = client.put(f"/v1/sessions/{other['id']}/state", content=state.content,
                     headers={"content-type": ST})
    assert imp.status_code == 200, imp.text
    assert imp.json()["version"] == 0
    assert snapshot(client, other["id"])[1].replace(b'2]}', b'0]}') == snapshot(
        client, sid)[1].replace(b'2]}', b'0]}')


def test_first_put_defines_params(client: httpx.Client) -> None:
    s = client.post("/v1/sessions", json={"optimizer": "sgd"}).json()
    assert s["version"] is None and s["tensors"] == {}
    r = step(client, s["id"], {"w": torch.ones(2)})
    assert r.status_code == 409 and r.json()["code"] == "no_params"
    put = client.put(f"/v1/sessions/{s['id']}/params",
                     content=st_body({"w": torch.zeros(2, dtype=torch.float64)}),
                     headers={"content-type": ST})
    assert put.status_code == 200 and put.json()["version"] == 0
    assert put.json()["tensors"] == {"w": {"dtype": "float64", "shape": [2]}}
    r = step(client, s["id"], {"w": torch.ones(2, dtype=torch.bfloat16)})
    assert r.status_code == 200
    assert decode(r)["w"].dtype == torch.float64
    assert torch.equal(decode(r)["w"], torch.full((2,), -0.001, dtype=torch.float64))


def test_missing_gradient_leaves_param_untouched(client: httpx.Client, session: dict) -> None:
    r = step(client, session["id"], grads(b=None))
    assert r.status_code == 200
    out = decode(r)
    assert out["b"].item() == 0.5
    stats = client.get(f"/v1/sessions/{session['id']}/stats").json()
    assert stats["tensors"]["b"]["step"] == 0 and stats["tensors"]["w"]["step"] == 1


def test_return_none_and_stats(client: httpx.Client, session: dict) -> None:
    r = step(client, session["id"], grads(), **{"return": "none"})
    assert r.status_code == 200 and r.content == b"" and r.headers["etag"] == '"1"'
    stats = client.get(f"/v1/sessions/{session['id']}/stats").json()
    assert stats["version"] == 1
    g = torch.cat([grads()["w"], grads()["b"].reshape(1)])
    assert stats["last_grad_norm"] == pytest.approx(float(g.double().norm()), rel=1e-6)
    assert stats["last_update_norm"] > 0
    sq = 0.01 * g.double() ** 2
    eff = 0.01 / (sq.sqrt() + 1e-8)
    e = stats["tensors"]["w"]["effective_lr"]
    assert e["min"] == pytest.approx(float(eff[:3].min()), rel=1e-5)
    assert e["max"] == pytest.approx(float(eff[:3].max()), rel=1e-5)


def test_idempotency_key_applies_once(client: httpx.Client, session: dict) -> None:
    h = {"idempotency-key": "abc-1"}
    first = step(client, session["id"], grads(), h)
    again = step(client, session["id"], grads(), h)
    assert first.status_code == again.status_code == 200
    assert again.headers["x-optserve-version"] == "1"
    assert again.headers["idempotent-replayed"] == "true"
    assert torch.equal(decode(first)["w"], decode(again)["w"])
    assert client.get(f"/v1/sessions/{session['id']}").json()["version"] == 1


def test_ops_endpoints(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    m = client.get("/metrics")
    assert m.status_code == 200
    assert "optserve_requests_total" in m.text and "optserve_steps_applied_total" in m.text
    spec = client.get("/openapi.json").json()
    step_op = spec["paths"]["/v1/sessions/{session_id}/step"]["post"]
    assert set(step_op["requestBody"]["content"]) == {ST, JS}


def test_presets(client: httpx.Client) -> None:
    s = client.post("/v1/sessions", json={"preset": "rnn"}).json()
    assert s["hyperparams"]["lr"] == 0.0001 and s["hyperparams"]["alpha"] == 0.9


def test_patch_momentum_later_and_immutables(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    step(client, sid, grads())
    r = client.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"momentum": 0.9}})
    assert r.status_code == 200
    assert step(client, sid, grads()).status_code == 200
    for change in ({"hyperparams": {"centered": True}}, {"optimizer": "sgd"}):
        before = snapshot(client, sid)
        r = client.patch(f"/v1/sessions/{sid}", json=change)
        assert r.status_code == 422 and r.json()["code"] == "immutable_hyperparam"
        assert snapshot(client, sid) == before


# --------------------------------------------------------------------------- errors


def assert_problem(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status and body["code"] == code
    assert {"type", "title", "detail"} <= set(body)
    return body


BAD_STEPS = [
    # (content-type, body, headers, status, code)
    ("text/plain", b"x", {}, 415, "unsupported_media_type"),
    (ST, b"\x01\x02", {}, 400, "malformed_body"),
    (ST, b"\xff" * 8 + b"{}", {}, 400, "malformed_body"),
    (JS, b"{not json", {}, 400, "malformed_body"),
    (JS, b'{"w": 1}', {}, 400, "malformed_body"),
    (JS, json.dumps({"tensors": {"w": {"dtype": "float32", "shape": [3], "data": [1, 2]}}}),
     {}, 400, "malformed_body"),
    (JS, json.dumps({"tensors": {"nope": jt([1.0])}}), {}, 422, "unknown_tensor"),
    (JS, json.dumps({"tensors": {"w": jt([1.0, 2.0])}}), {}, 422, "shape_mismatch"),
    (ST, st_body({"w": torch.tensor([1, 2, 3], dtype=torch.int32)}), {}, 422, "dtype_mismatch"),
    (ST, st_body({"w": torch.tensor([1.0, float("nan"), 0.0])}), {}, 422,
     "non_finite_gradient"),
    (ST, st_body({"w": torch.tensor([1.0, float("inf"), 0.0])}), {}, 422,
     "non_finite_gradient"),
    (ST, st_body({"w": torch.ones(3)}), {"accept": "text/html"}, 406, "not_acceptable"),
    (ST, st_body({"w": torch.ones(3)}), {"if-match": '"7"'}, 412, "version_mismatch"),
    (ST, st_body({"w": torch.ones(3)}), {"x-optserve-base-version": "9"}, 409,
     "future_version"),
    (ST, st_body({"w": torch.ones(3)}), {"x-optserve-base-version": "x"}, 422,
     "invalid_header"),
]


@pytest.mark.parametrize(("ctype", "body", "headers", "status", "code"), BAD_STEPS)
def test_rejected_step_changes_nothing(client: httpx.Client, session: dict, ctype: str,
                                       body: bytes | str, headers: dict, status: int,
                                       code: str) -> None:
    sid = session["id"]
    assert step(client, sid, grads()).status_code == 200
    before = snapshot(client, sid)
    key = f"k-{code}-{status}"
    r = client.post(f"/v1/sessions/{sid}/step", content=body,
                    headers={"content-type": ctype, "idempotency-key": key, **headers})
    problem = assert_problem(r, status, code)
    if status == 409:
        assert problem["current_version"] == 1
    assert snapshot(client, sid) == before
    # A rejected request leaves no idempotency record: a good retry with its key applies.
    ok = step(client, sid, grads(), {"idempotency-key": key})
    assert ok.status_code == 200 and ok.headers["x-optserve-version"] == "2"


def test_non_finite_result_is_refused(client: httpx.Client) -> None:
    s = create(client, {"w": torch.tensor([3.0e38])}, optimizer="sgd",
               hyperparams={"lr": 1.0, "maximize": True})
    before = snapshot(client, s["id"])
    r = step(client, s["id"], {"w": torch.tensor([3.0e38])})
    assert_problem(r, 422, "non_finite_result")
    assert snapshot(client, s["id"]) == before
    ok = step(client, s["id"], {"w": torch.tensor([1.0])})
    assert ok.status_code == 200 and ok.headers["x-optserve-version"] == "1"


def test_stale_gradient(client: httpx.Client) -> None:
    s = create(client, {"w": torch.zeros(2)}, max_staleness=1)
    for _ in range(3):
        step(client, s["id"], {"w": torch.ones(2)})
    before = snapshot(client, s["id"])
    r = step(client, s["id"], {"w": torch.ones(2)}, {"x-optserve-base-version": "1"})
    assert assert_problem(r, 409, "stale_gradient")["current_version"] == 3
    assert snapshot(client, s["id"]) == before
    r = step(client, s["id"], {"w": torch.ones(2)}, {"x-optserve-base-version": "2"})
    assert r.status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"hyperparams": {"lr": -1}}, "lr"),
    ({"hyperparams": {"alpha": 1.0}}, "alpha"),
    ({"hyperparams": {"eps": -1e-8}}, "eps"),
    ({"hyperparams": {"momentum": -0.1}}, "momentum"),
    ({"hyperparams": {"weight_decay": -0.1}}, "weight_decay"),
    ({"hyperparams": {"bogus": 1}}, "bogus"),
    ({"optimizer": "sgd", "hyperparams": {"nesterov": True}}, "nesterov"),
    ({"optimizer": "adagrad", "hyperparams": {"lr_decay": -1}}, "lr_decay"),
])
def test_invalid_hyperparams(client: httpx.Client, body: dict, field: str) -> None:
    n = len(client.get("/v1/sessions").json()["sessions"])
    r = client.post("/v1/sessions", json=body)
    problem = assert_problem(r, 422, "invalid_hyperparams")
    assert field in problem["detail"]
    assert len(client.get("/v1/sessions").json()["sessions"]) == n


def test_invalid_patch_changes_nothing(client: httpx.Client, session: dict) -> None:
    before = snapshot(client, session["id"])
    r = client.patch(f"/v1/sessions/{session['id']}", json={"hyperparams": {"alpha": 2}})
    assert_problem(r, 422, "invalid_hyperparams")
    assert snapshot(client, session["id"]) == before


def test_create_errors(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/sessions", content=b"{", headers={"content-type": JS}),
                   400, "malformed_body")
    assert_problem(client.post("/v1/sessions", content=b"{}", headers={"content-type": "x/y"}),
                   415, "unsupported_media_type")
    assert_problem(client.post("/v1/sessions", json={"mode": "weird"}), 422, "invalid_request")
    assert_problem(client.post("/v1/sessions", json={"params": {"w": {"dtype": "float32"}}}),
                   400, "malformed_body")
    assert_problem(client.post("/v1/sessions", json={"params": {"w": jt([1], "int32")}}),
                   422, "dtype_mismatch")


def test_put_params_preconditions(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    body = st_body({"w": torch.zeros(3), "b": torch.tensor(0.0)})
    before = snapshot(client, sid)
    assert_problem(client.put(f"/v1/sessions/{sid}/params", content=body,
                              headers={"content-type": ST}), 428, "precondition_required")
    assert_problem(client.put(f"/v1/sessions/{sid}/params", content=body,
                              headers={"content-type": ST, "if-match": '"3"'}),
                   412, "version_mismatch")
    assert_problem(client.put(f"/v1/sessions/{sid}/params", content=st_body({"w": torch.zeros(3)}),
                              headers={"content-type": ST, "if-match": '"0"'}),
                   422, "missing_tensor")
    assert_problem(client.put(f"/v1/sessions/{sid}/params",
                              content=st_body({"w": torch.zeros(4), "b": torch.tensor(0.0)}),
                              headers={"content-type": ST, "if-match": '"0"'}),
                   422, "shape_mismatch")
    assert snapshot(client, sid) == before


def test_not_found_and_state_accept(client: httpx.Client, session: dict) -> None:
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/params"),
                         ("PUT", "/params"), ("POST", "/step"), ("GET", "/state"),
                         ("PUT", "/state"), ("GET", "/stats")]:
        r = client.request(method, f"/v1/sessions/nope{path}", content=b"{}",
                           headers={"content-type": JS})
        assert_problem(r, 404, "session_not_found")
    r = client.get(f"/v1/sessions/{session['id']}/state", headers={"accept": JS})
    assert_problem(r, 406, "not_acceptable")


def test_body_limit(redis_url: str) -> None:
    from conftest import start_thread_server

    srv = start_thread_server(redis_url=redis_url, kernel="exact", max_body_bytes=1000)
    try:
        with httpx.Client(base_url=srv.url) as c:
            s = create(c, {"w": torch.zeros(10)})
            before = snapshot(c, s["id"])
            big = st_body({"w": torch.zeros(1000)})
            assert_problem(step(c, s["id"], {"w": torch.zeros(1000)}), 413, "body_too_large")

            def chunks() -> Iterator[bytes]:  # no Content-Length: enforced while reading
                for i in range(0, len(big), 256):
                    yield big[i : i + 256]

            r = c.post(f"/v1/sessions/{s['id']}/step", content=chunks(),
                       headers={"content-type": ST})
            assert_problem(r, 413, "body_too_large")
            assert snapshot(c, s["id"]) == before
    finally:
        srv.stop()


def test_tenants_are_isolated(keyed_server: str) -> None:
    with httpx.Client(base_url=keyed_server) as anon, \
            httpx.Client(base_url=keyed_server, headers={"authorization": "Bearer ka"}) as alice, \
            httpx.Client(base_url=keyed_server, headers={"authorization": "Bearer kb"}) as bob:
        s = create(alice, {"w": torch.zeros(2)})
        sid = s["id"]
        before = snapshot(alice, sid)
        for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/params"),
                             ("PUT", "/params"), ("POST", "/step"), ("GET", "/state"),
                             ("PUT", "/state"), ("GET", "/stats")]:
            r = bob.request(method, f"/v1/sessions/{sid}{path}", content=b"{}",
                            headers={"content-type": JS})
            assert_problem(r, 404, "session_not_found")
            r = anon.request(method, f"/v1/sessions/{sid}{path}")
            assert_problem(r, 401, "unauthorized")
        assert_problem(anon.get("/v1/sessions", headers={"authorization": "Bearer nope"}),
                       401, "unauthorized")
        assert sid not in [x["id"] for x in bob.get("/v1/sessions").json()["sessions"]]
        assert sid in [x["id"] for x in alice.get("/v1/sessions").json()["sessions"]]
        assert anon.get("/readyz").status_code == 200
        assert anon.get("/metrics").status_code == 200
        assert snapshot(alice, sid) == before


@pytest.mark.parametrize(("server", "n"), [("live_server", 4), ("fused_server", 100_000)])
def test_overflowing_state_is_refused(request: pytest.FixtureRequest, server: str,
                                      n: int) -> None:
    """A float32 gradient of 1e30 squares to inf in square_avg while the update stays 0:
    refused on the plain path and by the fused kernel's own check."""
    with httpx.Client(base_url=request.getfixturevalue(server), timeout=120) as client:
        s = create(client, {"w": torch.zeros(n)})
        assert step(client, s["id"], {"w": torch.ones(n)}).status_code == 200
        before = snapshot(client, s["id"])
        r = step(client, s["id"], {"w": torch.full((n,), 1e30)})
        assert_problem(r, 422, "non_finite_result")
        assert "optimizer state" in r.json()["detail"]
        assert snapshot(client, s["id"]) == before


def test_error_precedence_edges(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    before = snapshot(client, sid)
    # An If-Match that names no version matches none: 412, not a 422 about the header.
    r = step(client, sid, grads(), {"if-match": "garbage"})
    assert_problem(r, 412, "version_mismatch")
    # A malformed tensor body (400) wins over other invalid fields (422) on create.
    r = client.post("/v1/sessions", json={"mode": "weird", "params": {"w": {"dtype": "x"}}})
    assert_problem(r, 400, "malformed_body")
    # If-Match is checked before "no parameters yet".
    empty = client.post("/v1/sessions", json={}).json()
    r = step(client, empty["id"], grads(), {"if-match": '"3"'})
    assert_problem(r, 412, "version_mismatch")
    assert snapshot(client, sid) == before


def test_malformed_headers_lose_to_412_and_409(client: httpx.Client, session: dict) -> None:
    sid = session["id"]
    before = snapshot(client, sid)
    bad = {"x-optserve-weight": "-1"}
    assert_problem(step(client, sid, grads(), {**bad, "if-match": '"9"'}), 412,
                   "version_mismatch")
    assert_problem(step(client, sid, grads(), {**bad, "x-optserve-base-version": "9"}), 409,
                   "future_version")
    assert_problem(step(client, sid, grads(), bad), 422, "invalid_header")
    assert snapshot(client, sid) == before
