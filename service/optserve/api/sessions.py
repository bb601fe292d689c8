"""Session documents: create, list, read, change hyperparameters, delete."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optserve_client import wire

from .. import optim
from ..engine import check_finite, check_param_body, locked_session
from ..settings import Settings
from ..store import keys
from ..store.redis_store import Store, now
from ..tensors import describe
from .deps import (
    content_type,
    get_settings,
    get_store,
    read_body,
    session_meta,
    tenant,
    version_headers,
)
from .problems import Problem

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class SyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contributions: int = Field(..., ge=1, le=10_000)
    min_contributions: int | None = Field(None, ge=1, le=10_000)
    timeout_s: float = Field(60.0, gt=0, le=86_400)


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimizer: Literal["rmsprop", "adagrad", "sgd"] | None = None
    preset: str | None = Field(None, description=f"one of {sorted(optim.PRESETS)}")
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] | None = Field(
        None, description="Initial parameters as in the JSON wire format's `tensors`."
    )
    mode: Literal["async", "sync"] = "async"
    max_staleness: int | None = Field(None, ge=0)
    sync: SyncConfig | None = None
    name: str | None = Field(None, max_length=256)


class PatchSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimizer: Literal["rmsprop", "adagrad", "sgd"] | None = None
    hyperparams: dict[str, Any] | None = None
    max_staleness: int | None = Field(None, ge=0)
    name: str | None = Field(None, max_length=256)


class SessionDoc(BaseModel):
    id: str
    name: str | None
    optimizer: str
    hyperparams: dict[str, Any]
    mode: str
    max_staleness: int | None
    sync: dict[str, Any] | None
    version: int | None
    tensors: dict[str, dict[str, Any]]
    created_at: str
    updated_at: str


class SessionList(BaseModel):
    sessions: list[SessionDoc]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def document(meta: dict[str, Any], head: dict[str, float | None]) -> dict[str, Any]:
    v = head.get(keys.VERSION)
    updated = head.get(keys.UPDATED) or meta["created_at"]
    return {
        "id": meta["id"],
        "name": meta.get("name"),
        "optimizer": meta["optimizer"],
        "hyperparams": meta["hyperparams"],
        "mode": meta["mode"],
        "max_staleness": meta.get("max_staleness"),
        "sync": meta.get("sync"),
        "version": int(v) if v is not None else None,
        "tensors": meta["tensors"],
        "created_at": _iso(meta["created_at"]),
        "updated_at": _iso(updated),
    }


async def current_document(store: Store, meta: dict[str, Any]) -> dict[str, Any]:
    return document(meta, await store.head(meta["id"]))


def validate_hyperparams(optimizer: str, values: dict[str, Any]) -> dict[str, Any]:
    """Torch's defaults filled in; a 422 naming each bad field and its allowed range."""
    try:
        hp = optim.get_optimizer(optimizer).hyperparams.model_validate(values)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'hyperparams'}: {e['msg']}" for e in errors)
        raise Problem(422, "invalid_hyperparams", f"invalid {optimizer} hyperparameters: "
                      f"{detail}", errors=errors) from None
    return hp.model_dump(mode="json")


def _load_json(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(400, "malformed_body", f"body is not valid JSON: {exc}") from None


def _parse_json(raw: bytes | bytearray | Any, model: type[BaseModel]) -> Any:
    doc = _load_json(raw) if isinstance(raw, (bytes, bytearray)) else raw
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors)
        raise Problem(422, "invalid_request", detail, errors=errors) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/"
                                                                "schemas/{model}")}}}}


@router.post("", status_code=201, response_model=SessionDoc,
             openapi_extra=_json_body(CreateSession),
             responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}}})
async def create_session(request: Request, response: Response, tenant: str = Depends(tenant),
                         store: Store = Depends(get_store),
                         settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    content_type(request, (wire.JSON_TYPE,))
    raw = await read_body(request, settings.max_body_bytes)
    doc = _load_json(raw)
    params = None
    if isinstance(doc, dict) and doc.get("params") is not None:
        # Malformed tensors are a 400, which wins over any 422 of the rest of the body.
        try:
            params = wire.decode_json(json.dumps({"tensors": doc["params"]}))
        except wire.WireError as exc:
            raise Problem(400, "malformed_body", f"params: {exc}") from None
    body: CreateSession = _parse_json(doc, CreateSession)
    optimizer, hyper = body.optimizer, dict(body.hyperparams)
    if body.preset is not None:
        if body.preset not in optim.PRESETS:
            raise Problem(422, "invalid_hyperparams", f"unknown preset {body.preset!r}; "
                          f"known: {sorted(optim.PRESETS)}")
        preset_opt, preset_hp = optim.PRESETS[body.preset]
        if optimizer not in (None, preset_opt):
            raise Problem(422, "invalid_hyperparams", f"preset {body.preset!r} is for "
                          f"{preset_opt}, not {optimizer}")
        optimizer, hyper = preset_opt, {**preset_hp, **hyper}
    optimizer = optimizer or "rmsprop"
    hp = validate_hyperparams(optimizer, hyper)
    if body.mode == "sync" and body.sync is None:
        raise Problem(422, "invalid_request", "sync mode needs `sync.contributions`")
    sync = None
    if body.sync is not None:
        sync = body.sync.model_dump()
        if sync["min_contributions"] is None:
            sync["min_contributions"] = sync["contributions"]
        if sync["min_contributions"] > sync["contributions"]:
            raise Problem(422, "invalid_request", "sync.min_contributions cannot exceed "
                          "sync.contributions")
    fields = None
    declared: dict[str, Any] = {}
    if params is not None:
        check_param_body(None, params)
        check_finite(params, "cpu", "parameter")
        declared = describe(params)
        fields = {keys.param_field(n): t.data for n, t in params.items()}
    meta = {
        "id": secrets.token_urlsafe(18),
        "tenant": tenant,
        "name": body.name,
        "optimizer": optimizer,
        "hyperparams": hp,
        "mode": body.mode,
        "max_staleness": body.max_staleness,
        "sync": sync,
        "tensors": declared,
        "created_at": now(),
    }
    await store.create(meta, fields)
    idem = request.headers.get("idempotency-key")
    if idem is not None:
        # A retried create returns the session the first try made (and drops this one).
        first = await store.claim_create(tenant, idem, meta["id"], settings.idempotency_ttl_s)
        if first != meta["id"]:
            await store.delete(meta["id"], tenant)
            existing = await store.get_meta(first)
            if existing is not None and existing.get("tenant") == tenant:
                response.headers["Location"] = f"/v1/sessions/{first}"
                response.headers["Idempotent-Replayed"] = "true"
                doc = await current_document(store, existing)
                response.headers.update(version_headers(doc["version"]))
                return doc
            raise Problem(409, "idempotency_key_reused", "this Idempotency-Key created a "
                          "session that has since been deleted; use a new key",
                          current_version=None)
    request.app.state.engine.warm(meta)
    response.headers["Location"] = f"/v1/sessions/{meta['id']}"
    response.headers.update(version_headers(0 if fields is not None else None))
    return document(meta, {keys.VERSION: 0 if fields is not None else None})


@router.get("", response_model=SessionList)
async def list_sessions(tenant: str = Depends(tenant), store: Store = Depends(get_store)
                        ) -> dict[str, Any]:
    ids = await store.list_ids(tenant)
    metas = await store.get_metas(ids)
    live = [m for m in metas if m is not None and m.get("tenant") == tenant]
    heads = await store.heads([m["id"] for m in live])
    return {"sessions": [document(m, h) for m, h in zip(live, heads, strict=True)]}


@router.get("/{session_id}", response_model=SessionDoc)
async def get_session(response: Response, meta: dict[str, Any] = Depends(session_meta),
                      store: Store = Depends(get_store)) -> dict[str, Any]:
    doc = await current_document(store, meta)
    response.headers.update(version_headers(doc["version"]))
    return doc


@router.patch("/{session_id}", response_model=SessionDoc, openapi_extra=_json_body(PatchSession))
async def patch_session(request: Request, response: Response,
                        meta: dict[str, Any] = Depends(session_meta),
                        store: Store = Depends(get_store),
                        settings: Settings = Depends(get_settings)) -> dict[str, Any]:
    content_type(request, (wire.JSON_TYPE, "application/merge-patch+json"))
    raw = await read_body(request, settings.max_body_bytes)
    body: PatchSession = _parse_json(raw, PatchSession)
    sid = meta["id"]
    async with store.step_txn(sid) as txn:
        meta, _ = locked_session(txn)
        steps = await txn.call("HGET", keys.tensors(sid), keys.STEPS)
        stepped = bool(steps and int(steps))
        optimizer = body.optimizer or meta["optimizer"]
        if optimizer != meta["optimizer"]:
            if stepped:
                raise Problem(422, "immutable_hyperparam", "`optimizer` cannot change once a "
                              "step has been applied", field="optimizer")
            merged = dict(body.hyperparams or {})
        else:
            merged = {**meta["hyperparams"], **(body.hyperparams or {})}
        hp = validate_hyperparams(optimizer, merged)
        if stepped and hp.get("centered", False) != meta["hyperparams"].get("centered", False):
            raise Problem(422, "immutable_hyperparam", "`centered` cannot change once a step "
                          "has been applied", field="centered")
        meta = {**meta, "optimizer": optimizer, "hyperparams": hp}
        fields_set = body.model_fields_set
        if "max_staleness" in fields_set:
            meta["max_staleness"] = body.max_staleness
        if "name" in fields_set:
            meta["name"] = body.name
        cmds: list[Any] = [("SET", keys.meta(sid), json.dumps(meta))]
        old_momentum = txn.meta["hyperparams"].get("momentum", 0)
        if old_momentum == 0 and hp.get("momentum", 0) != 0:
            # Momentum switched on later starts from a fresh buffer, not one left over from
            # an earlier stretch with momentum.
            stale = [f for f in await txn.call("HKEYS", keys.tensors(sid))
                     if f.endswith(b".momentum_buffer") and f.startswith(b"s.")]
            if stale:
                cmds.append(("HDEL", keys.tensors(sid), *stale))
        await txn.execute(cmds)
    request.app.state.engine.cache.drop(sid)
    request.app.state.engine.warm(meta)
    doc = await current_document(store, meta)
    response.headers.update(version_headers(doc["version"]))
    return doc


@router.delete("/{session_id}", status_code=204, response_class=Response)
async def delete_session(request: Request, meta: dict[str, Any] = Depends(session_meta),
                         store: Store = Depends(get_store)) -> Response:
    async with store.step_txn(meta["id"]):  # waits for a step in flight, then deletes
        await store.delete(meta["id"], meta["tenant"])
    request.app.state.engine.cache.drop(meta["id"])
    return Response(status_code=204)
