"""``POST /v1/sessions/{id}/step`` straight to its handler.

At 1e4 elements FastAPI's routing (a regex per route) and dependency solving cost more than
the step's update itself (see the README's "Where the microseconds go"). This ASGI layer,
the innermost middleware, recognises the step's path, does the same auth and session lookup
as the dependencies (the same functions, in the same order) and calls the route's own body
(`tensors.run_step`); errors go to the application's own exception handlers. Anything
unusual (another method, a root path, a query other than ``return=params|none``) goes the
FastAPI way, which answers it exactly as before.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import DomainError
from ..session import SessionMeta
from ..store.redis_store import Store
from . import deps, tensors

KNOWN_SESSIONS = 10_000

_PREFIX = "/v1/sessions/"
_SUFFIX = "/step"
_RETURN = {b"": "params", b"return=params": "params", b"return=none": "none"}


class KnownSessions(OrderedDict[str, SessionMeta]):
    """Sessions this process has seen: their tenant and mode never change and their ids are
    never reused, so a step need not read the document before taking the lock (which reads
    it again). Bounded; the oldest entries go first. Shared with `hot_route`."""

    def remember(self, meta: SessionMeta) -> None:
        self[meta.id] = meta
        self.move_to_end(meta.id)
        while len(self) > KNOWN_SESSIONS:
            self.popitem(last=False)


def step_route() -> Any:
    """The step's APIRoute, put in the scope as the router puts it (metrics, logs and spans
    name a request by its template)."""
    return next(r for r in tensors.router.routes if getattr(r, "path", "").endswith(_SUFFIX))


class StepFastPath:
    """Serves the step route without the router; every other request passes through."""

    def __init__(self, app: ASGIApp, root: FastAPI, known: KnownSessions) -> None:
        self.app = app
        self.root = root
        self.route = step_route()
        self.known = known

    async def _step_known(self, request: Request, meta: SessionMeta, return_: str) -> Any:
        """A step of a session seen before, without the look-up's round trip."""
        state = self.root.state
        try:
            return await tensors.run_step(request, meta, state.engine, state.sync_rounds,
                                          state.settings, return_)
        except DomainError as exc:
            raise await checked_refusal(state.store, self.known, meta.id, exc) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = step_query(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        sid, return_ = found
        scope["route"] = self.route
        scope["path_params"] = {"session_id": sid}
        request = Request(scope, receive, send)
        state = self.root.state
        try:
            settings = state.settings
            tenant = await deps.tenant(request, settings)
            meta = self.known.get(sid)
            if meta is None or meta.tenant != tenant:
                meta = await deps.session_meta(sid, tenant, state.store)
                self.known.remember(meta)
                response = await tensors.run_step(request, meta, state.engine,
                                                  state.sync_rounds, settings, return_)
            else:
                response = await self._step_known(request, meta, return_)
        except Exception as exc:
            handler = handler_for(self.root, exc)
            if handler is None:
                raise  # the ErrorBoundary's 500, as for any route
            response = await handler(request, exc)
        await response(scope, receive, send)


async def checked_refusal(store: Store, known: KnownSessions, sid: str,
                          exc: DomainError) -> DomainError:
    """A refusal of a known session's step, made without the look-up: under the lock the
    step reads the document afresh (a session deleted since is a 404 there), but a refusal
    before the lock (415, 406, 413, 400...) first checks that the session still exists, as
    the look-up would have: the contract's 404 comes first."""
    if exc.code != "session_not_found" and await store.get_meta(sid) is None:
        known.pop(sid, None)
        return DomainError("session_not_found", f"no session {sid!r}")
    return exc


def handler_for(root: FastAPI, exc: Exception) -> Any:
    """The application's handler for `exc` (its class or nearest base), as Starlette's
    exception middleware picks it."""
    handlers = root.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def step_query(scope: Scope) -> tuple[str, str] | None:
    """(session id, return) of a plain ``POST /v1/sessions/{id}/step`` (else None)."""
    sid = _session_of(scope)
    return_ = _RETURN.get(scope.get("query_string", b"")) if sid else None
    return None if return_ is None or sid is None else (sid, return_)


def _session_of(scope: Scope) -> str | None:
    """The session id of a plain ``POST /v1/sessions/{id}/step`` (else None)."""
    if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    sid = path[len(_PREFIX):-len(_SUFFIX)]
    return sid if sid and "/" not in sid else None
