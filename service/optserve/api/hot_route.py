"""The hot step served below the middleware stack: one coroutine from request to response.

`hot_step.try_step` commits a small step of a session this process holds in one Redis round
trip; at 1e4 elements the layers around it (request context, body budget and deadline,
error boundary, Starlette's request and header objects) cost as much as the step itself
(README, "Where the microseconds go"). This outermost layer takes only requests the hot
path can commit: a plain safetensors step (no hyperparameters, no weight) of an async session
this process has seen and holds in its cache, whose body arrives complete within its
Content-Length and the hot-step bound, with tracing off. For those it does what the stack
does: the request id, the body budget and deadline, the metrics and access-log line, the
same response through the same response class, errors through the application's handlers.
Anything else, and any step the hot path declines (it has written nothing then), goes down
the stack as it came, its body replayed: that path answers it exactly as before.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optserve_client import wire

from .. import hot_step, metrics, tracing
from ..errors import DomainError
from ..logs import REQUEST, RequestContext
from ..session import SessionMeta
from .bodies import timeout_error
from .deps import (
    DEFAULT_TENANT,
    PARSE_ON_LOOP_BYTES,
    digest,
    parse_cost,
    parse_if_match,
    parse_version_header,
    version_headers,
)
from .negotiation import negotiate
from .observability import REQUEST_ID, record, request_id
from .problems import internal_error, log
from .step_path import KnownSessions, handler_for, step_query, step_route
from .tensors import TensorResponse

_SAFETENSORS = wire.SAFETENSORS_TYPE


@dataclass(slots=True)
class _Plan:
    """A request the hot path may take: what the stack's checks would have found."""

    sid: str
    meta: SessionMeta
    declared: int
    headers: dict[str, str]
    if_match: int | None
    base: int | None
    idem: str | None
    encode: Any
    rid: str


class HotStepRoute:
    """Serves hot steps itself; every other request passes through untouched."""

    def __init__(self, app: ASGIApp, root: FastAPI, known: KnownSessions) -> None:
        self.app = app
        self.root = root
        self.known = known
        self.route = step_route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = step_query(scope) if scope["type"] == "http" else None
        try:
            plan = self._plan(scope, *found) if found is not None else None
        except Exception:  # nothing is read or sent yet: the stack answers it
            log.exception("the hot step's checks failed; the request goes the usual way")
            plan = None
        if plan is None:
            await self.app(scope, receive, send)
            return
        scope["app"] = self.root  # as Starlette sets it, for the handlers' requests
        start = time.perf_counter()
        state = self.root.state
        budget = state.body_budget
        chunks: list[bytes] = []
        received = held = 0
        complete = served = False
        token = REQUEST.set(RequestContext(plan.rid, "POST", plan.meta.tenant, scope))
        metrics.IN_FLIGHT.inc()
        try:
            try:
                async with _deadline(state.settings.body_timeout_s):
                    while not complete:
                        message = await receive()
                        if message["type"] != "http.request":
                            break  # a disconnect: the stack answers it
                        chunk = message.get("body", b"")
                        complete = not message.get("more_body", False)
                        if chunk:
                            chunks.append(chunk)
                            received += len(chunk)
                            metrics.IN_FLIGHT_BYTES.inc(len(chunk))
                            if received > plan.declared or len(chunk) > budget.free():
                                complete = False  # the stack refuses it (400 or 503)
                                break
                            budget.charge(len(chunk))
                            held += len(chunk)
            except TimeoutError:
                error = timeout_error(state.settings.body_timeout_s)
                await self._send(scope, receive, send, plan,
                                 await self._problem(scope, receive, send, error),
                                 start, received)
                served = True
            if complete and received == plan.declared:
                served = await self._serve(scope, receive, send, plan, chunks, start)
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.IN_FLIGHT_BYTES.dec(received)
            budget.release(held)
            REQUEST.reset(token)
        if not served:
            await self.app(scope, _replay(chunks, complete, receive), send)

    def _plan(self, scope: Scope, sid: str, return_: str) -> _Plan | None:
        """The plan for a step request the hot path can take, else None."""
        state = self.root.state
        settings = state.settings
        limit = min(settings.hot_step_bytes, settings.max_body_bytes,
                    settings.max_inflight_body_bytes)
        if not limit or self.root.root_path or tracing.recording():
            return None
        h: dict[str, str] = {}
        for k, v in scope["headers"]:
            h.setdefault(k.decode("latin-1"), v.decode("latin-1"))  # the first, as Starlette
        declared = h.get("content-length", "")
        if not (declared.isascii() and declared.isdigit()) or not 0 < int(declared) <= limit \
                or "transfer-encoding" in h or "x-optserve-weight" in h \
                or wire.base_type(h.get("content-type")) != _SAFETENSORS \
                or negotiate(h.get("accept"), _SAFETENSORS) != _SAFETENSORS:
            return None
        tenant = _tenant(settings, h.get("authorization", ""))
        meta = self.known.get(sid)
        if tenant is None or meta is None or meta.tenant != tenant or meta.is_sync \
                or not state.engine.cache.holds(sid):
            return None
        idem = h.get("idempotency-key")
        if idem is not None and not (0 < len(idem) <= 255 and idem.isprintable()):
            return None
        raw_match = h.get("if-match")
        if_match = parse_if_match(raw_match) if (raw_match or "").strip() != "*" else None
        try:
            base = parse_version_header(h.get("x-optserve-base-version"),
                                        "X-Optserve-Base-Version")
        except DomainError:
            return None
        encode = wire.encode_safetensors_parts if return_ == "params" else None
        return _Plan(sid, meta, int(declared), h, if_match, base, idem, encode,
                     request_id(h.get(REQUEST_ID)))

    async def _serve(self, scope: Scope, receive: Receive, send: Send, plan: _Plan,
                     chunks: list[bytes], start: float) -> bool:
        """The step through `hot_step.try_step`; False when it declined (nothing sent)."""
        body = bytearray(chunks[0]) if len(chunks) == 1 else bytearray(b"".join(chunks))
        if parse_cost(body, _SAFETENSORS) > PARSE_ON_LOOP_BYTES:
            return False  # a long header: the stack parses it off the event loop
        try:
            grads, metadata = wire.decode_safetensors(body)
        except wire.WireError:
            return False  # the stack answers 400
        if metadata:
            return False  # hyperparameters, or metadata to check: the stack's step
        engine = self.root.state.engine
        scope["route"] = self.route
        scope["path_params"] = {"session_id": plan.sid}
        try:
            outcome = await hot_step.try_step(
                engine, plan.meta, grads, idempotency_key=plan.idem, base_version=plan.base,
                if_match=plan.if_match, encode=plan.encode,
                request_digest=await digest("POST", scope["path"], plan.headers, body))
            if outcome is None:
                return False
            metrics.child(metrics.STEPS, plan.meta.optimizer).inc()
            headers = version_headers(outcome.version)
            if outcome.body is None:
                if outcome.after_send is not None:
                    outcome.after_send()
                response: Response = Response(status_code=200, headers=headers)
            else:
                response = TensorResponse(outcome.body, _SAFETENSORS, headers,
                                          outcome.after_send)
        except Exception as exc:  # the commit's own errors: answered as the stack would
            response = await self._problem(scope, receive, send, exc)
        await self._send(scope, receive, send, plan, response, start, len(body))
        return True

    async def _problem(self, scope: Scope, receive: Receive, send: Send,
                       exc: Exception) -> Response:
        handler = handler_for(self.root, exc)
        if handler is None:
            log.exception("unexpected error on POST %s", scope.get("path"))
            return internal_error().response(scope.get("path"))
        response: Response = await handler(Request(scope, receive, send), exc)
        return response

    async def _send(self, scope: Scope, receive: Receive, send: Send, plan: _Plan,
                    response: Response, start: float, received: int) -> None:
        """`response`, with the request id, then its metrics and access-log line."""
        rid = (REQUEST_ID.encode(), plan.rid.encode())
        status, sent = 500, 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid]}
            else:
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await response(scope, receive, counting_send)
        finally:
            record("POST", self.route.path, status, time.perf_counter() - start, received,
                   sent)


def _tenant(settings: Any, authorization: str) -> str | None:
    """The tenant of a valid bearer key (None: the stack answers 401)."""
    if not settings.keys:
        return DEFAULT_TENANT
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    found: str | None = settings.tenant_for(key.strip())
    return found


def _replay(chunks: list[bytes], complete: bool, receive: Receive) -> Receive:
    """`receive` as if nothing had been read: the chunks read so far first, as one."""
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                               "more_body": not complete}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    @asynccontextmanager
    async def _deadline(seconds: float) -> AsyncIterator[None]:
        with anyio.fail_after(seconds):
            yield
