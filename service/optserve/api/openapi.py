"""The OpenAPI document, completed from the shared facts so that generated clients work.

FastAPI's own document knows the routes, bodies and models. This module adds what only the
contract knows, in one place, so new routes, codes and headers flow in without touching the
routes: every problem response (the `Problem` schema's ``code`` enum is ``spec.PROBLEMS``),
the request headers as parameters, the bearer scheme, response headers, typed 200 bodies,
and links from the create operation for stateful clients and fuzzers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from optserve_client import wire
from optserve_client.spec import PROBLEMS

from .problems import PROBLEM_TYPE, TITLES

_REF = "#/components/schemas/"
OPEN_ROUTES = ("livez", "readyz", "metrics")
"""Operations that need no API key."""

# Statuses each operation can answer besides its success; the problem codes behind them are
# spec.PROBLEMS. Every /v1 operation can also answer 401, 500 and 503, and any status in
# PROBLEMS that no row names (a code added later) is documented on every /v1 operation.
_BODY = (400, 413, 415, 422)
ERROR_STATUSES: dict[str, tuple[int, ...]] = {
    "create_session": (*_BODY, 409),
    "list_sessions": (),
    "get_session": (404,),
    "patch_session": (404, *_BODY),
    "delete_session": (404,),
    "get_params": (404, 406, 409),
    "put_params": (404, *_BODY, 409, 412, 428),
    "step": (404, *_BODY, 406, 409, 412),
    "get_state": (404, 406, 409),
    "put_state": (404, *_BODY, 409, 412, 428),
    "stats": (404,),
    "livez": (500,),
    "readyz": (500, 503),
    "metrics": (500,),
}
_EVERY_V1 = (401, 500, 503)
_ROUTING = (404, 405)  # no route, or not this method: answers for a path, not an operation

_VERSION = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
HEADERS: dict[str, dict[str, Any]] = {
    "If-Match": {
        "description": 'Apply only at this version: `"3"` (an ETag), or `*` for any.',
        "schema": {"type": "string"}},
    "Idempotency-Key": {
        "description": "1-255 printable characters; a retry with the same key applies "
                       "nothing twice and gets the first outcome (`Idempotent-Replayed`).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
    "X-Optserve-Base-Version": {
        "description": "The version the gradient was computed on (staleness, sync rounds).",
        "schema": _VERSION},
    "Accept": {
        "description": "The tensor format of the answer (default: safetensors for a GET, "
                       "the request's own format for a step).",
        "schema": {"type": "string", "enum": [wire.JSON_TYPE, wire.SAFETENSORS_TYPE]}},
    "X-Optserve-Weight": {
        "description": "Sync mode: this contribution's weight, e.g. its example count.",
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e300}},
}
REQUEST_HEADERS: dict[str, tuple[str, ...]] = {
    "create_session": ("Idempotency-Key",),
    "get_params": ("Accept",),
    "put_params": ("If-Match",),
    "put_state": ("If-Match",),
    "step": ("Accept", "If-Match", "Idempotency-Key", "X-Optserve-Base-Version",
             "X-Optserve-Weight"),
}

_VERSION_HEADERS = {
    "ETag": {"description": 'The version, quoted: `"3"`.', "schema": {"type": "string"}},
    "X-Optserve-Version": {"description": "The version.", "schema": _VERSION},
}
_REPLAYED = {"Idempotent-Replayed": {
    "description": "`true` when this answers a retry of an Idempotency-Key already applied.",
    "schema": {"type": "string", "enum": ["true"]}}}
SUCCESS_HEADERS: dict[str, dict[str, Any]] = {
    "create_session": {**_VERSION_HEADERS, **_REPLAYED, "Location": {
        "description": "The new session's path.", "schema": {"type": "string"}}},
    "get_session": _VERSION_HEADERS,
    "patch_session": _VERSION_HEADERS,
    "get_params": _VERSION_HEADERS,
    "put_params": _VERSION_HEADERS,
    "step": {**_VERSION_HEADERS, **_REPLAYED},
    "get_state": _VERSION_HEADERS,
    "put_state": _VERSION_HEADERS,
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 0}}}
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}

SESSION_DOC_BODY = ("put_params", "put_state")
"""Operations FastAPI sees as returning a bare Response that answer the session document."""

LINKED_FROM_CREATE = ("get_session", "patch_session", "delete_session", "get_params",
                      "put_params", "step", "get_state", "put_state", "stats")


def problem_schema() -> dict[str, Any]:
    """RFC 9457 problem details with the service's stable codes."""
    return {
        "type": "object",
        "title": "Problem",
        "description": "Every error is one of these (application/problem+json).",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": sorted(PROBLEMS),
                     "description": "What went wrong; see the error table in docs/API.md."},
            "instance": {"type": "string"},
            "current_version": {"type": ["integer", "null"]},
        },
        "additionalProperties": True,
    }


def stats_schema() -> dict[str, Any]:
    number = {"type": ["number", "null"]}
    return {
        "type": "object",
        "title": "Stats",
        "required": ["version", "steps_applied", "last_grad_norm", "last_update_norm",
                     "optimizer", "hyperparams", "tensors"],
        "properties": {
            "version": {"type": ["integer", "null"]},
            "steps_applied": {"type": "integer"},
            "last_grad_norm": number,
            "last_update_norm": number,
            "optimizer": {"type": "string"},
            "hyperparams": {"type": "object", "additionalProperties": True},
            "tensors": {"type": "object", "additionalProperties": {
                "type": "object",
                "required": ["step"],
                "properties": {
                    "step": {"type": "integer"},
                    "effective_lr": {"anyOf": [{"type": "null"}, {
                        "type": "object",
                        "required": ["min", "median", "max"],
                        "properties": {k: {"type": "number"} for k in ("min", "median", "max")},
                    }]},
                },
            }},
        },
    }


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if isinstance(op, dict) and "responses" in op:
                yield path, method, op


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Move nested ``$defs`` (from a model's own JSON schema) to components, where refs point."""
    if isinstance(node, dict):
        defs = node.pop("$defs", None)
        for name, schema in (defs or {}).items():
            schemas.setdefault(name, schema)
            _hoist_defs(schema, schemas)
        for value in list(node.values()):
            _hoist_defs(value, schemas)
    elif isinstance(node, list):
        for value in node:
            _hoist_defs(value, schemas)


def _name_request_models(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A titled inline JSON request schema (a pydantic model) becomes a named component."""
    for media in op.get("requestBody", {}).get("content", {}).values():
        schema = media.get("schema", {})
        title = schema.get("title")
        if title and "properties" in schema:
            schemas.setdefault(title, schema)
            media["schema"] = {"$ref": _REF + title}


def _error_statuses(name: str, path: str, op: dict[str, Any]) -> list[int]:
    statuses = set(ERROR_STATUSES.get(name, ()))
    if name not in ERROR_STATUSES:  # a route not in the table yet: what its shape implies
        statuses |= {404} if "{session_id}" in path else set()
        statuses |= set(_BODY) if "requestBody" in op else set()
    if path.startswith("/v1/"):
        named = {s for row in ERROR_STATUSES.values() for s in row} | set(_EVERY_V1)
        unnamed = {s for s, _ in PROBLEMS.values() if s not in named and s not in _ROUTING}
        statuses |= set(_EVERY_V1) | unnamed
    return sorted(statuses)


def _problem_response(status: int) -> dict[str, Any]:
    codes = sorted(c for c, (s, _) in PROBLEMS.items() if s == status)
    response: dict[str, Any] = {
        "description": TITLES.get(status, "Error") + (f": {', '.join(codes)}" if codes else ""),
        "content": {PROBLEM_TYPE: {"schema": {"$ref": _REF + "Problem"}}},
    }
    if status in ERROR_HEADERS:
        response["headers"] = copy.deepcopy(ERROR_HEADERS[status])
    return response


def _complete(name: str, path: str, op: dict[str, Any]) -> None:
    op["operationId"] = name
    responses = op["responses"]
    responses.pop("422", None)  # FastAPI's own validation error, never sent as documented
    for status in _error_statuses(name, path, op):
        responses[str(status)] = _problem_response(status)
    success = next(s for s in responses if s.startswith("2"))
    ok = responses[success]
    if wire.JSON_TYPE in ok.get("content", {}):
        # Generators decode the first media type: the JSON form is the typed one.
        ok["content"] = {wire.JSON_TYPE: ok["content"].pop(wire.JSON_TYPE), **ok["content"]}
    if name in SESSION_DOC_BODY:
        ok["content"] = {"application/json": {"schema": {"$ref": _REF + "SessionDoc"}}}
        ok["description"] = "The session document."
    if name == "stats":
        ok["content"] = {"application/json": {"schema": {"$ref": _REF + "Stats"}}}
    if name in SUCCESS_HEADERS:
        ok.setdefault("headers", {}).update(copy.deepcopy(SUCCESS_HEADERS[name]))
    if name == "step":
        ok["description"] = ("The new parameters in the Accept format (the request's own "
                             "without one); no body with `?return=none`.")
    if name == "create_session":
        ok["links"] = {
            "".join(w.title() for w in target.split("_")): {
                "operationId": target, "parameters": {"session_id": "$response.body#/id"}}
            for target in LINKED_FROM_CREATE}
    params = op.setdefault("parameters", [])
    for header in REQUEST_HEADERS.get(name, ()):
        params.append({"name": header, "in": "header", "required": False,
                       **copy.deepcopy(HEADERS[header])})
    if not params:
        op.pop("parameters")
    if name in OPEN_ROUTES:
        op["security"] = []
    body = op.get("requestBody", {}).get("content", {})
    if name == "patch_session" and "application/json" in body:
        body["application/merge-patch+json"] = copy.deepcopy(body["application/json"])


def _route_name(operation_id: str, path: str, method: str) -> str:
    """The route function's name, from FastAPI's default id ``{name}{path}_{method}``."""
    suffix = re.sub(r"\W", "_", path) + "_" + method
    return operation_id.removesuffix(suffix) if operation_id.endswith(suffix) else operation_id


def build(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app`, completed from the contract."""
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                      description=app.description, routes=app.routes)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, method, op in _operations(doc):
        _name_request_models(op, schemas)
        _complete(_route_name(op["operationId"], path, method), path, op)
    _hoist_defs(doc, schemas)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Problem"] = problem_schema()
    schemas["Stats"] = stats_schema()
    doc["components"]["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "`Authorization: Bearer <api-key>` when the server has API keys "
                       "(OPTSERVE_API_KEYS); an open server ignores it."}}
    doc["security"] = [{"bearer": []}]
    doc.setdefault("info", {})["description"] = (
        "Tensor bodies are safetensors (`" + wire.SAFETENSORS_TYPE + "`) or JSON (`"
        + wire.JSON_TYPE + "`); errors are `" + PROBLEM_TYPE + "`. See docs/API.md.")
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
