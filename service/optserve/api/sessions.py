"""Session documents: create, list, read, change hyperparameters, delete."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optserve_client import wire
from optserve_client.spec import PRESETS

from ..errors import DomainError
from ..sessions import View
from .deps import (
    SessionDep,
    SessionsDep,
    SettingsDep,
    TenantDep,
    content_type,
    idempotency_key,
    off_loop,
    read_body,
    request_digest,
    version_headers,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


class SyncConfig(BaseModel):
    """A round closes at ``contributions`` or at ``target_weight`` (whichever comes first);
    at its deadline it steps with at least ``min_contributions`` or ``min_weight``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    contributions: int | None = Field(None, ge=1, le=10_000)
    min_contributions: int | None = Field(None, ge=1, le=10_000)
    timeout_s: float | None = Field(None, gt=0, le=86_400, description="default 60")
    target_weight: float | None = Field(None, gt=0, le=1e15)
    min_weight: float | None = Field(None, gt=0, le=1e15)


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optimizer: Literal["rmsprop", "adagrad", "sgd"] | None = None
    preset: str | None = Field(None, description=f"one of {sorted(PRESETS)}")
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
    sync: SyncConfig | None = Field(None, description="merged over the session's; a null "
                                    "field removes it; applies from the next round")


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


def document(view: View) -> dict[str, Any]:
    """The session resource as the API shows it."""
    meta, head = view.meta, view.head
    return {
        "id": meta.id,
        "name": meta.name,
        "optimizer": meta.optimizer,
        "hyperparams": meta.hyperparams,
        "mode": meta.mode,
        "max_staleness": meta.max_staleness,
        "sync": meta.sync.to_json() if meta.sync is not None else None,
        "version": head.version,
        "tensors": meta.tensors_json(),
        "created_at": _iso(meta.created_at),
        "updated_at": _iso(head.updated_at or meta.created_at),
    }


def respond(response: Response, view: View) -> dict[str, Any]:
    """The document, with its version headers on `response`."""
    response.headers.update(version_headers(view.head.version))
    return document(view)


def _load_json(raw: bytes | bytearray) -> Any:
    """The body's JSON; anything json.loads refuses (including nesting past its depth and
    integers past Python's digit limit) or a repeated key is a 400."""
    try:
        return wire.load_json(bytes(raw), "body")
    except wire.WireError as exc:
        raise DomainError("malformed_body", str(exc)) from None


def _parse_json(raw: bytes | bytearray | Any, model: type[BaseModel]) -> Any:
    doc = _load_json(raw) if isinstance(raw, (bytes, bytearray)) else raw
    try:
        return model.model_validate(doc, strict=True)  # JSON types as the schema says
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "msg": e["msg"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors)
        raise DomainError("invalid_request", detail, errors=errors) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/"
                                                                "schemas/{model}")}}}}


def _create_doc(raw: bytearray) -> tuple[Any, dict[str, wire.WireTensor] | None]:
    """The create body as JSON, and its ``params`` decoded (a big one: off the event loop)."""
    doc = _load_json(raw)
    params = None
    if isinstance(doc, dict) and doc.get("params") is not None:
        # Malformed tensors are a 400, which wins over any 422 of the rest of the body.
        try:
            params = wire.decode_json(json.dumps({"tensors": doc["params"]}))
        except RecursionError:
            raise DomainError("malformed_body", "params: nested too deeply") from None
        except wire.WireError as exc:
            raise DomainError("malformed_body", f"params: {exc}") from None
    return doc, params


@router.post("", status_code=201, response_model=SessionDoc,
             openapi_extra=_json_body(CreateSession),
             responses={201: {"headers": {"Location": {"schema": {"type": "string"}}}}})
async def create_session(request: Request, response: Response, tenant: TenantDep,
                         sessions: SessionsDep, settings: SettingsDep) -> dict[str, Any]:
    content_type(request, (wire.JSON_TYPE,))
    raw = await read_body(request, settings.max_body_bytes)
    doc, params = await off_loop(lambda: _create_doc(raw), len(raw))
    body: CreateSession = _parse_json(doc, CreateSession)
    view = await sessions.create(
        tenant, optimizer=body.optimizer, preset=body.preset, hyperparams=body.hyperparams,
        params=params, mode=body.mode, max_staleness=body.max_staleness,
        sync=body.sync.model_dump(exclude_unset=True) if body.sync is not None else None,
        name=body.name,
        idempotency_key=idempotency_key(request),
        request_digest=await request_digest(request, raw))
    response.headers["Location"] = f"/v1/sessions/{view.meta.id}"
    if view.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return respond(response, view)


@router.get("", response_model=SessionList)
async def list_sessions(tenant: TenantDep, sessions: SessionsDep) -> dict[str, Any]:
    return {"sessions": [document(v) for v in await sessions.listing(tenant)]}


@router.get("/{session_id}", response_model=SessionDoc)
async def get_session(response: Response, meta: SessionDep, sessions: SessionsDep
                      ) -> dict[str, Any]:
    return respond(response, await sessions.view(meta))


@router.patch("/{session_id}", response_model=SessionDoc, openapi_extra=_json_body(PatchSession))
async def patch_session(request: Request, response: Response, meta: SessionDep,
                        sessions: SessionsDep, settings: SettingsDep) -> dict[str, Any]:
    content_type(request, (wire.JSON_TYPE, "application/merge-patch+json"))
    raw = await read_body(request, settings.max_body_bytes)
    body: PatchSession = _parse_json(raw, PatchSession)
    changes = {f: getattr(body, f) for f in ("max_staleness", "name")
               if f in body.model_fields_set}
    if "sync" in body.model_fields_set and body.sync is None:
        raise DomainError("invalid_request", "sync: a sync session keeps its settings; "
                          "change them with a partial object", field="sync")
    sync = body.sync.model_dump(exclude_unset=True) if body.sync is not None else None
    view = await sessions.patch(meta, optimizer=body.optimizer, hyperparams=body.hyperparams,
                                changes=changes, sync=sync)
    return respond(response, view)


@router.delete("/{session_id}", status_code=204, response_class=Response)
async def delete_session(meta: SessionDep, sessions: SessionsDep) -> Response:
    await sessions.delete(meta)
    return Response(status_code=204)
