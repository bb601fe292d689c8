"""The OpenAPI document: valid, complete from the contract, and good enough to generate a client
(openapi-python-client) that drives a real server."""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from optserve_client.spec import PROBLEMS

PACKAGE = "optserve_openapi_client"
GENERATOR_CONFIG = f"""\
project_name_override: optserve-openapi-client
package_name_override: {PACKAGE}
post_hooks: []
"""


@pytest.fixture(scope="module")
def document(live_server: str) -> dict[str, Any]:
    return httpx.get(f"{live_server}/openapi.json").raise_for_status().json()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _operations(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for item in doc["paths"].values() for op in item.values()}


def test_document_is_valid_and_has_no_dangling_refs(document: dict[str, Any]) -> None:
    validate(document)
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref


def test_problems_come_from_the_shared_table(document: dict[str, Any]) -> None:
    problem = document["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == sorted(PROBLEMS)
    ops = _operations(document)
    documented = {int(s) for op in ops.values() for s in op["responses"] if s[0] in "45"}
    assert {s for s, _ in PROBLEMS.values() if s not in (404, 405)} <= documented
    for op in ops.values():
        for status, response in op["responses"].items():
            if status[0] in "45":
                assert list(response["content"]) == ["application/problem+json"], status
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_headers_security_and_links(document: dict[str, Any]) -> None:
    ops = _operations(document)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]
    for name in ("livez", "readyz", "metrics"):
        assert ops[name]["security"] == []
    headers = {p["name"] for p in ops["step"]["parameters"] if p["in"] == "header"}
    assert {"If-Match", "Idempotency-Key", "X-Optserve-Base-Version",
            "X-Optserve-Weight"} <= headers
    assert {p["name"] for p in ops["put_params"]["parameters"]} >= {"If-Match"}
    assert {p["name"] for p in ops["create_session"]["parameters"]} >= {"Idempotency-Key"}
    created = ops["create_session"]["responses"]["201"]
    assert {"Location", "ETag", "Idempotent-Replayed"} <= set(created["headers"])
    targets = {link["operationId"] for link in created["links"].values()}
    assert {"get_session", "step", "put_params", "stats", "delete_session"} <= targets
    assert "Retry-After" in ops["step"]["responses"]["503"]["headers"]
    for name in ("put_params", "put_state"):
        schema = ops[name]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/SessionDoc"}
    step_ok = ops["step"]["responses"]["200"]["content"]
    assert set(step_ok) == {"application/json", "application/octet-stream"}
    assert step_ok["application/octet-stream"]["schema"]["format"] == "binary"


@pytest.fixture(scope="module")
def generated(live_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A client generated from the live server's /openapi.json, imported."""
    out = tmp_path_factory.mktemp("openapi-client")
    config = out / "config.yaml"
    config.write_text(GENERATOR_CONFIG)
    proc = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate",
         "--url", f"{live_server}/openapi.json", "--config", str(config), "--meta", "none",
         "--output-path", str(out / PACKAGE), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed
    assert "warning" not in printed.lower(), printed
    assert "will not be generated" not in printed, printed
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[mod]


def _tensors(data: list[float]) -> dict[str, Any]:
    return {"tensors": {"w": {"dtype": "float32", "shape": [len(data)], "data": data}}}


def test_generated_client_drives_a_real_server(generated: Any, live_server: str) -> None:
    api = importlib.import_module(f"{PACKAGE}.api.sessions")
    tensors_api = importlib.import_module(f"{PACKAGE}.api.tensors")
    models = importlib.import_module(f"{PACKAGE}.models")
    client = generated.Client(base_url=live_server, raise_on_unexpected_status=True)
    for name in ("create_session", "get_session", "delete_session"):
        importlib.import_module(f"{PACKAGE}.api.sessions.{name}")
    for name in ("put_params", "step"):
        importlib.import_module(f"{PACKAGE}.api.tensors.{name}")

    body = models.CreateSession.from_dict({"optimizer": "rmsprop", "hyperparams": {"lr": 0.01}})
    created = api.create_session.sync_detailed(client=client, body=body,
                                               idempotency_key=uuid.uuid4().hex)
    assert created.status_code == 201
    sid = created.parsed.id
    assert created.headers["Location"] == f"/v1/sessions/{sid}"

    first = tensors_api.put_params.sync_detailed(
        sid, client=client, body=models.PutParamsJsonBody.from_dict(_tensors([1.0, -2.0])))
    assert first.status_code == 200 and first.parsed.version == 0
    second = tensors_api.put_params.sync_detailed(
        sid, client=client, body=models.PutParamsJsonBody.from_dict(_tensors([1.0, -2.0])),
        if_match='"0"')
    assert isinstance(second.parsed, models.SessionDoc)
    assert second.parsed.version == 1 and second.headers["ETag"] == '"1"'

    grad = models.StepJsonBody.from_dict(_tensors([0.5, -0.5]))
    key = uuid.uuid4().hex
    stepped = tensors_api.step.sync_detailed(sid, client=client, body=grad, idempotency_key=key,
                                             if_match='"1"')
    assert stepped.status_code == 200 and stepped.headers["X-Optserve-Version"] == "2"
    w = stepped.parsed.tensors["w"]
    assert w.shape == [2] and w.data == pytest.approx([0.9, -1.9], abs=1e-6)
    # A retry is the same request (same body and headers; another one under the key: 422).
    replay = tensors_api.step.sync_detailed(sid, client=client, body=grad, idempotency_key=key,
                                            if_match='"1"')
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["X-Optserve-Version"] == "2"

    bad = tensors_api.step.sync_detailed(
        sid, client=client, body=models.StepJsonBody.from_dict(
            {"tensors": {"nope": {"dtype": "float32", "shape": [1], "data": [1.0]}}}))
    assert bad.status_code == 422
    assert isinstance(bad.parsed, models.Problem)
    assert bad.parsed.code == models.ProblemCode.UNKNOWN_TENSOR

    assert api.delete_session.sync_detailed(sid, client=client).status_code == 204
    gone = api.get_session.sync_detailed(sid, client=client)
    assert gone.status_code == 404 and gone.parsed.code == models.ProblemCode.SESSION_NOT_FOUND
