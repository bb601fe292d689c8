"""Request dependencies and the checks every tensor route makes, in the API's error order.

Order (API.md): 401, 404, 415, 406, 413, 400, 428, 412, 409, 422. Auth and the session
lookup are FastAPI dependencies (the ``...Dep`` aliases below); the rest are called by the
routes in that order, and the operations below ``api/`` do the 428/412/409/422 checks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request

from optserve_client import wire

from ..checks import IfMatch
from ..engine import Engine
from ..errors import DomainError
from ..rounds import SyncRounds
from ..session import SessionMeta
from ..sessions import Sessions
from ..settings import OPEN_TENANT, Settings
from ..store.redis_store import Store
from .bodies import BODY_READER
from .body_pool import MIN_POOLED, BodyReader
from .negotiation import negotiate
from .problems import Problem

DEFAULT_TENANT = OPEN_TENANT
T = TypeVar("T")
_ETAG = re.compile(r'^\s*(?:W/)?"?(\d{1,18})"?\s*$')


# These are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool,
# which costs more than the whole of a small step.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_rounds(request: Request) -> SyncRounds:
    return request.app.state.sync_rounds


async def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RoundsDep = Annotated[SyncRounds, Depends(get_rounds)]
SessionsDep = Annotated[Sessions, Depends(get_sessions)]


async def tenant(request: Request, settings: SettingsDep) -> str:
    """The caller's tenant: from its bearer key, or the single open tenant with no keys set."""
    if not settings.keys:
        return DEFAULT_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem("unauthorized", "send `Authorization: Bearer <api-key>`",
                      headers={"WWW-Authenticate": "Bearer"})
    found = settings.tenant_for(key.strip())
    if found is None:
        raise Problem("unauthorized", "unknown API key",
                      headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return found


TenantDep = Annotated[str, Depends(tenant)]


async def session_meta(session_id: str, tenant: TenantDep, store: StoreDep) -> SessionMeta:
    """The session document as stored; another tenant's session is as unknown as none."""
    meta = await store.get_meta(session_id) if len(session_id) <= 64 else None
    if meta is None or meta.tenant != tenant:
        raise DomainError("session_not_found", f"no session {session_id!r}")
    return meta


SessionDep = Annotated[SessionMeta, Depends(session_meta)]


def content_type(request: Request, allowed: tuple[str, ...]) -> str:
    """415 unless the body's type is one we read."""
    kind = wire.base_type(request.headers.get("content-type"))
    if kind not in allowed:
        raise DomainError("unsupported_media_type",
                      f"Content-Type {kind or '(none)'!r} is not accepted here; use one of "
                      f"{list(allowed)}", accepted=list(allowed))
    return kind


def accept(request: Request, default: str, allowed: tuple[str, ...] = wire.TENSOR_TYPES) -> str:
    """406 unless the Accept header names a format we can produce."""
    chosen = negotiate(request.headers.get("accept"), default)
    if chosen is None or chosen not in allowed:
        raise DomainError("not_acceptable",
                      f"cannot produce any of {request.headers.get('accept')!r}; available: "
                      f"{list(allowed)}", available=list(allowed))
    return chosen


async def read_body(request: Request, limit: int) -> bytearray:
    """Read the body into one writable buffer, refusing it (413) as soon as it passes `limit`.

    Memory follows the bytes that arrived, never the declared Content-Length: the buffer
    grows as chunks come (CPython grows a bytearray in place, by realloc, so a 40 MB body
    costs what one preallocated buffer would). `limit` is also capped by the in-flight body
    budget, which a larger body could never fit (see `api/bodies.py`).
    """
    settings = request.app.state.settings
    limit = min(limit, settings.max_inflight_body_bytes)
    declared = request.headers.get("content-length")
    size_hint = 0
    if declared is not None:
        try:
            size_hint = int(declared)
        except ValueError:
            raise DomainError("malformed_body", "Content-Length is not a number") from None
        if size_hint > limit:
            raise DomainError("body_too_large", f"body of {size_hint} bytes is over the limit of "
                              f"{limit} bytes", limit=limit)
    # A large body goes into pooled buffers (pages already mapped; see api/body_pool.py),
    # given back by `BodyLimits` when the request is over.
    reader = (BodyReader(request.app.state.body_pool, size_hint)
              if size_hint >= MIN_POOLED else None)
    if reader is not None:
        request.scope[BODY_READER] = reader
    out = bytearray()
    n = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if n + len(chunk) > limit:
            raise DomainError("body_too_large", f"body is over the limit of {limit} bytes",
                              limit=limit)
        if declared is not None and n + len(chunk) > size_hint:
            raise DomainError("malformed_body", "body longer than its Content-Length")
        if reader is not None:
            reader.add(chunk)
        else:
            out += chunk
        n += len(chunk)
    if declared is not None and n != size_hint:
        raise DomainError("malformed_body", "body shorter than its Content-Length")
    return reader.body() if reader is not None else out


# What makes two requests "the same" for an Idempotency-Key, besides method, path and body.
_HASH_INLINE = 1024 * 1024
_DIGESTED_HEADERS = ("content-type", "if-match", "x-optserve-base-version", "x-optserve-weight")


async def request_digest(request: Request, body: bytes | bytearray) -> str | None:
    """The request's fingerprint, kept with its Idempotency-Key (None without a key)."""
    return await digest(request.method, request.url.path, request.headers, body)


async def digest(method: str, path: str, headers: Mapping[str, str],
                 body: bytes | bytearray) -> str | None:
    """`request_digest` from the request's parts (headers by lower-case name). Hashing runs
    off the event loop for a large body (sha256: about 1 ms per MB)."""
    if headers.get("idempotency-key") is None:
        return None
    h = hashlib.sha256()
    for part in (method, path, *(headers.get(k, "") for k in _DIGESTED_HEADERS)):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    if len(body) > _HASH_INLINE:
        await anyio.to_thread.run_sync(h.update, body)
    else:
        h.update(body)
    return h.hexdigest()


# Parsing is per-tensor Python (and JSON per number): ~200-300 ns a byte of JSON or of a
# safetensors header. Up to this many bytes of it stay on the event loop (a few ms).
PARSE_ON_LOOP_BYTES = 16 * 1024


def parse_cost(body: bytes | bytearray | memoryview, kind: str) -> int:
    """The bytes a decode parses: the whole body for JSON, the header for safetensors."""
    if kind == wire.SAFETENSORS_TYPE:
        return int.from_bytes(body[:8], "little") if len(body) >= 8 else 0
    return len(body)


async def off_loop(fn: Callable[[], T], cost: int) -> T:
    """`fn()`, in a worker thread when it parses more than `PARSE_ON_LOOP_BYTES`."""
    if cost > PARSE_ON_LOOP_BYTES:
        return await anyio.to_thread.run_sync(fn)
    return fn()


async def decode_tensors(body: bytearray, kind: str
                         ) -> tuple[dict[str, wire.WireTensor], dict[str, str] | None]:
    def decode() -> tuple[dict[str, wire.WireTensor], dict[str, str] | None]:
        try:
            return wire.decode(body, kind)
        except wire.WireError as exc:
            raise DomainError("malformed_body", str(exc)) from None

    return await off_loop(decode, parse_cost(body, kind))


def parse_if_match(value: str | None) -> int | None:
    """If-Match's version; a value that names no version can match none (-1: a 412)."""
    if value is None:
        return None
    m = _ETAG.match(value)
    return int(m.group(1)) if m else -1


def if_match_header(request: Request) -> IfMatch:
    """If-Match as a precondition on replacing tensors: a version, ``*``, or absent."""
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    return "*" if raw.strip() == "*" else parse_if_match(raw)


def idempotency_key(request: Request) -> str | None:
    """Idempotency-Key as sent; 422 unless 1-255 printable characters (as a step checks it)."""
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 255 and key.isprintable()):
        raise DomainError("invalid_header", "Idempotency-Key must be 1-255 printable characters",
                          header="Idempotency-Key")
    return key


def parse_version_header(value: str | None, header: str) -> int | None:
    if value is None:
        return None
    m = _ETAG.match(value)
    if not m:
        raise DomainError("invalid_header", f"{header}: expected a version number such as "
                      f'"3", got {value!r}', header=header)
    return int(m.group(1))


def version_headers(version: int | None) -> dict[str, str]:
    if version is None:
        return {}
    return {"ETag": f'"{version}"', "X-Optserve-Version": str(version)}
