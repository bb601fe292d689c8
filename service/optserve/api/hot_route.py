"""Steps of known sessions served in front of the middleware stack: one coroutine each.

At 1e4 elements the layers around a step (request context, body budget and deadline, error
boundaries, Starlette's request and header objects) cost as much as the step itself
(README, "Where the microseconds go"). This outermost layer serves a plain step of a
session this process has seen (`step_path.KnownSessions`), with a safetensors body within
its Content-Length and the hot-step bound, and tracing off: it does what the stack does for
it (the request id, the body budget and deadline, the same route body through
`tensors.apply_step` and `step_response`, errors through the application's handlers with
the contract's 404 first, the metrics and access-log line). Anything else goes down the
stack as it came, and so does a request whose body does not arrive whole (its bytes
replayed): that path answers it exactly as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optserve_client import wire

from .. import metrics, tracing
from ..checks import parse_step_hyperparams
from ..deadline import deadline
from ..errors import DomainError
from ..logs import REQUEST, RequestContext
from ..session import SessionMeta
from .bodies import timeout_error
from .deps import decode_tensors, digest
from .negotiation import negotiate
from .observability import REQUEST_ID, CountedSend, record, request_id, tenant_of
from .problems import internal_error, log
from .step_path import KnownSessions, checked_refusal, handler_for, step_query, step_route
from .tensors import apply_step, step_headers, step_response

_SAFETENSORS = wire.SAFETENSORS_TYPE


@dataclass(slots=True)
class _Plan:
    """A request this route serves: what the stack's checks up to the body found."""

    sid: str
    meta: SessionMeta
    declared: int
    headers: dict[str, str]
    encode: Any
    rid: str


class HotStepRoute:
    """Serves known sessions' plain steps itself; every other request passes through."""

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
            log.exception("the step route's checks failed; the request goes the usual way")
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
                async with deadline(state.settings.body_timeout_s):
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
                await self._serve(scope, receive, send, plan, chunks, start)
                served = True
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.IN_FLIGHT_BYTES.dec(received)
            budget.release(held)
            REQUEST.reset(token)
        if not served:
            await self.app(scope, _replay(chunks, complete, receive), send)

    def _plan(self, scope: Scope, sid: str, return_: str) -> _Plan | None:
        """The plan for a step request this route serves, else None."""
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
                or "transfer-encoding" in h \
                or wire.base_type(h.get("content-type")) != _SAFETENSORS \
                or negotiate(h.get("accept"), _SAFETENSORS) != _SAFETENSORS:
            return None
        tenant = tenant_of(settings, h)
        meta = self.known.get(sid)
        if tenant is None or meta is None or meta.tenant != tenant:
            return None
        encode = wire.encode_safetensors_parts if return_ == "params" else None
        return _Plan(sid, meta, int(declared), h, encode, request_id(h.get(REQUEST_ID)))

    async def _serve(self, scope: Scope, receive: Receive, send: Send, plan: _Plan,
                     chunks: list[bytes], start: float) -> None:
        """The route's body for the whole request body, then the response."""
        body = bytearray(chunks[0]) if len(chunks) == 1 else bytearray(b"".join(chunks))
        state = self.root.state
        scope["route"] = self.route
        scope["path_params"] = {"session_id": plan.sid}
        meta = plan.meta
        try:
            try:
                grads, metadata = await decode_tensors(body, _SAFETENSORS)
                hyperparams = parse_step_hyperparams(metadata)
                digest_ = await digest("POST", scope["path"], plan.headers, body)
                outcome = await apply_step(state.engine, state.sync_rounds, meta, grads,
                                           hyperparams, step_headers(plan.headers), digest_,
                                           plan.encode)
            except DomainError as exc:
                raise await checked_refusal(state.store, self.known, meta.id, exc) from None
            response = step_response(meta, outcome, _SAFETENSORS)
        except Exception as exc:  # answered as the stack would answer it
            response = await self._problem(scope, receive, send, exc)
        await self._send(scope, receive, send, plan, response, start, len(body))

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
        out = CountedSend(send, plan.rid)
        try:
            await response(scope, receive, out)
        finally:
            record("POST", self.route.path, out.status, time.perf_counter() - start,
                   received, out.sent)


def _replay(chunks: list[bytes], complete: bool, receive: Receive) -> Receive:
    """`receive` as if nothing had been read: the chunks read so far first, as one."""
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                               "more_body": not complete}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed

