"""Tensor resources: parameters, the step, the whole optimizer state, statistics."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response

from optserve_client import wire

from .. import optim
from ..engine import Engine, check_finite, check_param_body, locked_session
from ..metrics import STEPS
from ..settings import Settings
from ..store import keys
from ..store.redis_store import Store
from ..tensors import describe
from .deps import (
    accept,
    content_type,
    decode_tensors,
    get_engine,
    get_settings,
    get_store,
    parse_if_match,
    parse_version_header,
    read_body,
    session_meta,
    version_headers,
)
from .problems import Problem
from .sessions import current_document, validate_hyperparams

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["tensors"])

_JSON_TENSORS = {
    "type": "object",
    "required": ["tensors"],
    "additionalProperties": False,
    "properties": {"tensors": {"type": "object", "additionalProperties": {
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


class TensorResponse(Response):
    """A body sent as its parts (header, then each tensor's own memory), without a join."""

    def __init__(self, parts: list[bytes | memoryview], media_type: str,
                 headers: dict[str, str], after_send: Any = None) -> None:
        super().__init__(None, 200, headers, media_type, background=None)
        self.parts = parts
        self.after_send = after_send
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            last = len(self.parts) - 1
            for i, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part,
                            "more_body": i < last})
        finally:
            if self.after_send is not None:
                self.after_send()


def _require_if_match(request: Request, version: int | None, what: str) -> None:
    """Replacing tensors after version 0 needs If-Match naming the current version."""
    if version is None:
        return
    raw = request.headers.get("if-match")
    if raw is None:
        raise Problem(428, "precondition_required", f"replacing {what} needs "
                      f'If-Match: "{version}"', current_version=version)
    wanted = version if raw.strip() == "*" else parse_if_match(raw)
    if wanted != version:
        raise Problem(412, "version_mismatch", f"If-Match names version {wanted}, the "
                      f"session is at {version}", current_version=version)


@router.get("/params", response_class=Response, responses=_TENSOR_RESPONSE)
async def get_params(request: Request, meta: dict[str, Any] = Depends(session_meta),
                     engine: Engine = Depends(get_engine)) -> Response:
    kind = accept(request, wire.SAFETENSORS_TYPE)
    version, body = await engine.encode_params(meta, _encoder(kind))
    return TensorResponse(body, kind, version_headers(version))


@router.put("/params", openapi_extra=_TENSOR_BODY)
async def put_params(request: Request, meta: dict[str, Any] = Depends(session_meta),
                     store: Store = Depends(get_store), engine: Engine = Depends(get_engine),
                     settings: Settings = Depends(get_settings)) -> Response:
    kind = content_type(request, wire.TENSOR_TYPES)
    body = await read_body(request, settings.max_body_bytes)
    tensors, _ = decode_tensors(body, kind)
    sid = meta["id"]
    async with store.step_txn(sid) as txn:
        meta, version = locked_session(txn)
        declared = meta["tensors"] or None
        _require_if_match(request, version, "parameters")
        check_param_body(declared, tensors)
        check_finite(tensors, "cpu", "parameter")
        fields = {keys.param_field(n): t.data for n, t in tensors.items()}
        new_version = 0 if version is None else version + 1
        new_meta = None
        if declared is None:
            new_meta = {**meta, "tensors": describe(tensors)}
        engine.cache.drop(sid)
        abandon = await request.app.state.sync_rounds.abandon_cmds(txn, meta)
        await txn.commit(new_version, fields, count_step=False, meta=new_meta, extra=abandon)
        meta = new_meta or meta
    engine.warm(meta)
    doc = await current_document(store, meta)
    return Response(json.dumps(doc), media_type="application/json",
                    headers=version_headers(doc["version"]))


@router.post("/step", response_class=Response, openapi_extra=_TENSOR_BODY,
             responses=_TENSOR_RESPONSE)
async def step(
    request: Request,
    meta: dict[str, Any] = Depends(session_meta),
    engine: Engine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    return_: Literal["params", "none"] = Query("params", alias="return"),
) -> Response:
    kind = content_type(request, wire.TENSOR_TYPES)
    out_kind = accept(request, kind)
    body = await read_body(request, settings.max_body_bytes)
    grads, _ = decode_tensors(body, kind)
    h = request.headers
    if_match = parse_if_match(h.get("if-match")) if h.get(
        "if-match", "").strip() != "*" else None
    # A malformed header is a 422, which must not win over a 412/409 that also applies:
    # it is raised by the engine right after those checks.
    bad_header: Problem | None = None
    idem = h.get("idempotency-key")
    if idem is not None and not (0 < len(idem) <= 255 and idem.isprintable()):
        bad_header = Problem(422, "invalid_header", "Idempotency-Key must be 1-255 printable "
                             "characters", header="Idempotency-Key")
        idem = None
    try:
        base = parse_version_header(h.get("x-optserve-base-version"), "X-Optserve-Base-Version")
    except Problem as exc:
        bad_header, base = bad_header or exc, None
    try:
        weight = _weight(h.get("x-optserve-weight"))
    except Problem as exc:
        bad_header, weight = bad_header or exc, 1.0
    encode = _encoder(out_kind) if return_ == "params" else None
    if meta["mode"] == "sync":
        rounds = request.app.state.sync_rounds
        outcome = await rounds.contribute(meta, grads, idempotency_key=idem, base_version=base,
                                          if_match=if_match, weight=weight, encode=encode,
                                          bad_header=bad_header)
    else:
        outcome = await engine.step(meta, grads, idempotency_key=idem, base_version=base,
                                    if_match=if_match, encode=encode, bad_header=bad_header)
    if not outcome.replayed:
        STEPS.labels(meta["optimizer"]).inc()
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
        raise Problem(422, "invalid_header", f"X-Optserve-Weight must be a positive number, got "
                      f"{raw!r}", header="X-Optserve-Weight")
    return w


@router.get("/state", response_class=Response,
            responses={200: {"content": _STATE_CONTENT, "headers": _VERSION_HEADERS}})
async def get_state(request: Request, meta: dict[str, Any] = Depends(session_meta),
                    store: Store = Depends(get_store)) -> Response:
    accept(request, wire.SAFETENSORS_TYPE, (wire.SAFETENSORS_TYPE,))
    version, fields = await store.load(meta["id"])
    declared = meta["tensors"]
    out: dict[str, wire.WireTensor] = {}
    for fname, raw in sorted(fields.items()):
        parsed = keys.parse_field(fname)
        if parsed is None or parsed[1] not in declared:
            continue
        kind, name, key = parsed
        spec = declared[name]
        if kind == "p":
            out[f"param.{name}"] = wire.WireTensor(spec["dtype"], tuple(spec["shape"]),
                                                   memoryview(raw))
        elif key == "step":
            out[f"state.{name}.step"] = wire.WireTensor("float32", (), memoryview(raw))
        else:
            out[f"state.{name}.{key}"] = wire.WireTensor(spec["dtype"], tuple(spec["shape"]),
                                                         memoryview(raw))
    info = {"optimizer": meta["optimizer"], "hyperparams": meta["hyperparams"],
            "version": version}
    body = wire.encode_safetensors(out, {"optserve": json.dumps(info)})
    return Response(body, media_type=wire.SAFETENSORS_TYPE, headers=version_headers(version))


_STATE_KEYS = {
    "rmsprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
    "adagrad": {"step", "sum"},
    "sgd": {"momentum_buffer"},
}


@router.put("/state", openapi_extra={"requestBody": {"required": True,
                                                     "content": _STATE_CONTENT}})
async def put_state(request: Request, meta: dict[str, Any] = Depends(session_meta),
                    store: Store = Depends(get_store), engine: Engine = Depends(get_engine),
                    settings: Settings = Depends(get_settings)) -> Response:
    kind = content_type(request, (wire.SAFETENSORS_TYPE,))
    body = await read_body(request, settings.max_body_bytes)
    tensors, metadata = decode_tensors(body, kind)
    sid = meta["id"]
    async with store.step_txn(sid) as txn:
        meta, version = locked_session(txn)
        _require_if_match(request, version, "the state")
        info = _state_metadata(metadata)
        optimizer = info.get("optimizer", meta["optimizer"])
        if optimizer not in _STATE_KEYS:
            raise Problem(422, "invalid_hyperparams", f"unknown optimizer {optimizer!r}")
        hp = validate_hyperparams(optimizer, info.get("hyperparams", meta["hyperparams"]
                                                      if optimizer == meta["optimizer"] else {}))
        params = {n.removeprefix("param."): t for n, t in tensors.items()
                  if n.startswith("param.")}
        declared = meta["tensors"] or None
        check_param_body(declared, params)
        check_finite(params, "cpu", "parameter")
        fields: dict[str, Any] = {keys.param_field(n): t.data for n, t in params.items()}
        for name, t in tensors.items():
            if name.startswith("param."):
                continue
            fields[_state_field(name, t, params, optimizer)] = _state_bytes(name, t)
        stale = [f.decode() for f in await txn.call("HKEYS", keys.tensors(sid))
                 if f.startswith(b"s.") and f.decode() not in fields]
        new_version = 0 if version is None else version + 1
        new_meta = {**meta, "optimizer": optimizer, "hyperparams": hp,
                    "tensors": describe(params)}
        engine.cache.drop(sid)
        # Imported state counts as stepped (optimizer and centered are then fixed).
        steps = max((int(_step_value(t)) for n, t in tensors.items() if n.endswith(".step")),
                    default=int(any(n.startswith("state.") for n in tensors)))
        abandon = await request.app.state.sync_rounds.abandon_cmds(txn, meta)
        await txn.commit(new_version, fields, count_step=False, delete_fields=stale,
                         meta=new_meta,
                         extra=[("HSET", keys.tensors(sid), keys.STEPS, steps), *abandon])
    engine.warm(new_meta)
    doc = await current_document(store, new_meta)
    return Response(json.dumps(doc), media_type="application/json",
                    headers=version_headers(doc["version"]))


def _state_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    if not metadata or "optserve" not in metadata:
        return {}
    try:
        info = json.loads(metadata["optserve"])
    except json.JSONDecodeError:
        raise Problem(422, "invalid_state", "__metadata__.optserve is not JSON") from None
    if not isinstance(info, dict):
        raise Problem(422, "invalid_state", "__metadata__.optserve must be a JSON object")
    return info


def _state_field(name: str, t: wire.WireTensor, params: dict[str, wire.WireTensor],
                 optimizer: str) -> str:
    if not name.startswith("state.") or name.count(".") < 2:
        raise Problem(422, "invalid_state", f"tensor {name!r} is neither param.<name> nor "
                      "state.<name>.<key>", tensor=name)
    pname, _, key = name.removeprefix("state.").rpartition(".")
    if pname not in params:
        raise Problem(422, "invalid_state", f"state {name!r} is for unknown parameter {pname!r}",
                      tensor=name)
    if key not in _STATE_KEYS[optimizer]:
        raise Problem(422, "invalid_state", f"{optimizer} has no state {key!r}; it has "
                      f"{sorted(_STATE_KEYS[optimizer])}", tensor=name)
    p = params[pname]
    if key == "step":
        if t.shape != () or t.dtype not in ("float32", "float64"):
            raise Problem(422, "invalid_state", f"{name} must be a 0-dim float tensor",
                          tensor=name)
    elif t.shape != p.shape or t.dtype != p.dtype:
        raise Problem(422, "invalid_state", f"{name} must have the parameter's shape "
                      f"{list(p.shape)} and dtype {p.dtype}", tensor=name)
    return keys.state_field(pname, key)


def _step_value(t: wire.WireTensor) -> float:
    return float(wire.to_numpy(t).reshape(()))


def _state_bytes(name: str, t: wire.WireTensor) -> Any:
    if name.endswith(".step"):
        value = _step_value(t)
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise Problem(422, "invalid_state", f"{name} must be a non-negative whole number",
                          tensor=name)
        return torch.tensor(value, dtype=torch.float32).numpy().tobytes()
    arr = wire.to_numpy(t)
    if arr.size and not np.isfinite(arr).all():
        raise Problem(422, "invalid_state", f"{name} has NaN or infinite values", tensor=name)
    if name.endswith((".square_avg", ".sum")) and arr.size and (arr < 0).any():
        raise Problem(422, "invalid_state", f"{name} is an average of squares: it cannot be "
                      "negative", tensor=name)
    return t.data


@router.get("/stats")
async def stats(meta: dict[str, Any] = Depends(session_meta),
                engine: Engine = Depends(get_engine)) -> dict[str, Any]:
    version, fields = await engine.store.load(meta["id"])
    head = await engine.store.head(meta["id"])
    opt = optim.get_optimizer(meta["optimizer"])
    hp = opt.hyperparams.model_validate(meta["hyperparams"])
    tensors: dict[str, Any] = {}
    if version is not None:
        loaded = engine.materialize(meta, version, {
            f: b for f, b in fields.items() if f.startswith("s.")})
        for name in meta["tensors"]:
            st = loaded.state.get(name, {})
            entry: dict[str, Any] = {"step": int(st["step"].item()) if "step" in st else 0}
            eff = optim.effective_lr(opt, hp, st) if st else None
            if eff is not None and eff.numel():
                flat = eff.reshape(-1).double()
                entry["effective_lr"] = {"min": float(flat.min()),
                                         "median": float(flat.median()),
                                         "max": float(flat.max())}
            else:
                entry["effective_lr"] = None
            tensors[name] = entry
    return {
        "version": version,
        "steps_applied": int(head.get(keys.STEPS) or 0),
        "last_grad_norm": head.get(keys.LAST_GRAD_NORM),
        "last_update_norm": head.get(keys.LAST_UPDATE_NORM),
        "optimizer": meta["optimizer"],
        "hyperparams": meta["hyperparams"],
        "tensors": tensors,
    }
