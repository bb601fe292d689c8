"""Tensor resources: parameters, the step, the whole optimizer state, statistics."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response

from optserve_client import wire

from .. import metrics
from ..checks import parse_step_hyperparams
from ..engine import Engine, StepOutcome
from ..errors import DomainError
from ..rounds import SyncRounds
from ..session import SessionMeta
from ..settings import Settings
from .deps import (
    EngineDep,
    RoundsDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    accept,
    content_type,
    decode_tensors,
    if_match_header,
    parse_if_match,
    parse_version_header,
    read_body,
    request_digest,
    version_headers,
)
from .sessions import document

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["tensors"])

_JSON_TENSORS = {
    "type": "object",
    "required": ["tensors"],
    "additionalProperties": False,
    "properties": {"hyperparams": {
        "type": "object", "description": "a step's hyperparameters, applied to it (as PATCH)"},
        "tensors": {"type": "object", "additionalProperties": {
        "type": "object",
        "required": ["dtype", "shape", "data"],
        "additionalProperties": False,
        "properties": {
            "dtype": {"type": "string", "enum": list(wire.FLOAT_DTYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": {"type": "array", "items": {"type": "number"}},
        },
    }}},
}
_BINARY = {"type": "string", "format": "binary"}
_TENSOR_CONTENT = {
    wire.SAFETENSORS_TYPE: {"schema": _BINARY},
    wire.JSON_TYPE: {"schema": _JSON_TENSORS},
}
_TENSOR_BODY = {"requestBody": {"required": True, "content": _TENSOR_CONTENT}}
_VERSION_HEADERS = {
    "ETag": {"schema": {"type": "string"}, "description": 'The version, quoted: "3"'},
    "X-Optserve-Version": {"schema": {"type": "integer"}},
}
_TENSOR_RESPONSE = {200: {"content": _TENSOR_CONTENT, "headers": _VERSION_HEADERS,
                          "description": "tensors keyed by parameter name"}}
_STATE_CONTENT = {wire.SAFETENSORS_TYPE: {"schema": _BINARY}}


def _encoder(kind: str) -> Any:
    """Tensors to body parts; safetensors parts point into the tensors (no joined copy)."""
    if kind == wire.SAFETENSORS_TYPE:
        return wire.encode_safetensors_parts
    return lambda tensors: [wire.encode_json(tensors)]


# Answers up to this size are joined into one buffer: a copy is cheaper than a send each.
JOIN_BELOW = 128 * 1024


class TensorResponse(Response):
    """A body sent as its parts (header, then each tensor's own memory), without a join."""

    def __init__(self, parts: list[bytes | memoryview], media_type: str,
                 headers: dict[str, str], after_send: Any = None) -> None:
        super().__init__(None, 200, headers, media_type, background=None)
        self.parts = parts
        self.after_send = after_send
        self.size = sum(map(len, parts))
        self.headers["content-length"] = str(self.size)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        after_send, self.after_send = self.after_send, None
        drained: asyncio.Event | None = None
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            parts = self.parts
            if self.size <= JOIN_BELOW:  # one copy, one send, nothing lent out
                await send({"type": "http.response.body", "body": b"".join(parts)})
                return
            for part in parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            # The server may still hold some of the parts' bytes, by reference (uvloop
            # does): the tensors go back now, marked as lent until the closing message
            # returns (with `optserve serve`'s protocol, api/http_protocol.py: once the
            # transport holds none of them); the next step waits for that.
            if after_send is not None:
                drained = asyncio.Event()
                after_send(drained)
                after_send = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if drained is not None:
                drained.set()  # sent, or the connection is gone (its buffer with it)
            if after_send is not None:
                after_send()


@router.get("/params", response_class=Response, responses=_TENSOR_RESPONSE)
async def get_params(request: Request, meta: SessionDep, engine: EngineDep) -> Response:
    kind = accept(request, wire.SAFETENSORS_TYPE)
    version, body = await engine.encode_params(meta, _encoder(kind))
    return TensorResponse(body, kind, version_headers(version))


def _json_document(view: Any) -> Response:
    doc = document(view)
    return Response(json.dumps(doc), media_type="application/json",
                    headers=version_headers(doc["version"]))


@router.put("/params", openapi_extra=_TENSOR_BODY)
async def put_params(request: Request, meta: SessionDep, sessions: SessionsDep,
                     settings: SettingsDep) -> Response:
    kind = content_type(request, wire.TENSOR_TYPES)
    body = await read_body(request, settings.max_body_bytes)
    tensors, metadata = await decode_tensors(body, kind)
    if kind == wire.JSON_TYPE and metadata is not None:
        raise DomainError("malformed_body", "`hyperparams` ride only with a step; PATCH the "
                          "session to change them")
    view = await sessions.replace_params(meta, tensors, if_match_header(request))
    return _json_document(view)


@router.post("/step", response_class=Response, openapi_extra=_TENSOR_BODY,
             responses=_TENSOR_RESPONSE)
async def step(
    request: Request,
    meta: SessionDep,
    engine: EngineDep,
    rounds: RoundsDep,
    settings: SettingsDep,
    return_: Literal["params", "none"] = Query("params", alias="return"),
) -> Response:
    return await run_step(request, meta, engine, rounds, settings, return_)


async def run_step(request: Request, meta: SessionMeta, engine: Engine, rounds: SyncRounds,
                   settings: Settings, return_: str) -> Response:
    """The step, after auth and the session lookup: also called by `step_path.StepFastPath`,
    which reaches it without FastAPI's routing and dependency solving."""
    kind = content_type(request, wire.TENSOR_TYPES)
    out_kind = accept(request, kind)
    body = await read_body(request, settings.max_body_bytes)
    grads, metadata = await decode_tensors(body, kind)
    hyperparams = parse_step_hyperparams(metadata)
    digest = await request_digest(request, body)
    encode = _encoder(out_kind) if return_ == "params" else None
    outcome = await apply_step(engine, rounds, meta, grads, hyperparams,
                               step_headers(request.headers), digest, encode)
    return step_response(meta, outcome, out_kind)


@dataclass
class StepHeaders:
    """A step's optional headers. A malformed one is a 422, which must not win over a
    412/409 that also applies: it is raised by the engine right after those checks."""

    if_match: int | None
    idempotency_key: str | None
    base_version: int | None
    weight: float
    bad_header: DomainError | None


def step_headers(h: Mapping[str, str]) -> StepHeaders:
    """The step's headers (by lower-case name), parsed; also `hot_route`'s."""
    if_match = parse_if_match(h.get("if-match")) if h.get(
        "if-match", "").strip() != "*" else None
    bad_header: DomainError | None = None
    idem = h.get("idempotency-key")
    if idem is not None and not (0 < len(idem) <= 255 and idem.isprintable()):
        bad_header = DomainError("invalid_header", "Idempotency-Key must be 1-255 printable "
                             "characters", header="Idempotency-Key")
        idem = None
    try:
        base = parse_version_header(h.get("x-optserve-base-version"), "X-Optserve-Base-Version")
    except DomainError as exc:
        bad_header, base = bad_header or exc, None
    try:
        weight = _weight(h.get("x-optserve-weight"))
    except DomainError as exc:
        bad_header, weight = bad_header or exc, 1.0
    return StepHeaders(if_match, idem, base, weight, bad_header)


async def apply_step(engine: Engine, rounds: SyncRounds, meta: SessionMeta,
                     grads: dict[str, wire.WireTensor], hyperparams: dict[str, Any] | None,
                     h: StepHeaders, digest: str | None, encode: Any) -> StepOutcome:
    """The step of an async session, or a sync session's contribution."""
    if meta.is_sync:
        return await rounds.contribute(meta, grads, idempotency_key=h.idempotency_key,
                                       base_version=h.base_version, if_match=h.if_match,
                                       weight=h.weight, encode=encode,
                                       bad_header=h.bad_header, hyperparams=hyperparams,
                                       request_digest=digest)
    return await engine.step(meta, grads, idempotency_key=h.idempotency_key,
                             base_version=h.base_version, if_match=h.if_match, encode=encode,
                             bad_header=h.bad_header, hyperparams=hyperparams,
                             request_digest=digest)


def step_response(meta: SessionMeta, outcome: StepOutcome, out_kind: str) -> Response:
    """A step's 200: the version headers and, unless ``return=none``, the parameters."""
    if not outcome.replayed:
        metrics.child(metrics.STEPS, meta.optimizer).inc()
    headers = version_headers(outcome.version)
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    if outcome.body is None:
        if outcome.after_send is not None:
            outcome.after_send()
        return Response(status_code=200, headers=headers)
    return TensorResponse(outcome.body, out_kind, headers, outcome.after_send)


def _weight(raw: str | None) -> float:
    if raw is None:
        return 1.0
    try:
        w = float(raw)
    except ValueError:
        w = math.nan
    if not math.isfinite(w) or w <= 0:
        raise DomainError("invalid_header", f"X-Optserve-Weight must be a positive number, got "
                      f"{raw!r}", header="X-Optserve-Weight")
    return w


@router.get("/state", response_class=Response,
            responses={200: {"content": _STATE_CONTENT, "headers": _VERSION_HEADERS}})
async def get_state(request: Request, meta: SessionDep, sessions: SessionsDep) -> Response:
    accept(request, wire.SAFETENSORS_TYPE, (wire.SAFETENSORS_TYPE,))
    version, tensors, info = await sessions.export_state(meta)
    body = await sessions.engine.offload(
        wire.encode_safetensors, tensors, {"optserve": json.dumps(info)}, count=len(tensors),
        nbytes=lambda: sum(t.data.nbytes for t in tensors.values()))
    return Response(body, media_type=wire.SAFETENSORS_TYPE, headers=version_headers(version))


@router.put("/state", openapi_extra={"requestBody": {"required": True,
                                                     "content": _STATE_CONTENT}})
async def put_state(request: Request, meta: SessionDep, sessions: SessionsDep,
                    settings: SettingsDep) -> Response:
    kind = content_type(request, (wire.SAFETENSORS_TYPE,))
    body = await read_body(request, settings.max_body_bytes)
    tensors, metadata = await decode_tensors(body, kind)
    view = await sessions.import_state(meta, tensors, metadata, if_match_header(request))
    return _json_document(view)


@router.get("/stats")
async def stats(meta: SessionDep, sessions: SessionsDep) -> dict[str, Any]:
    return await sessions.stats(meta)
