"""The ASGI application: routes, error handling, metrics and the lifespan-managed Redis client."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .api import ops, problems, sessions, tensors
from .engine import Engine
from .metrics import BYTES_IN, BYTES_OUT, LATENCY, REQUESTS
from .rounds import SyncRounds
from .sessions import Sessions
from .settings import Settings
from .store.clients import close_client, make_client
from .store.redis_store import Store

log = logging.getLogger("optserve")


class MetricsMiddleware:
    """Counts, latency and body bytes per route template (plain ASGI: no per-request task)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        sent = [0]
        received = [0]

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            REQUESTS.labels(method, path, str(status[0])).inc()
            LATENCY.labels(method, path).observe(time.perf_counter() - start)
            BYTES_IN.labels(path).inc(received[0])
            BYTES_OUT.labels(path).inc(sent[0])


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.keys:
            log.warning("no API keys configured (OPTSERVE_API_KEYS): the service is OPEN, "
                        "single-tenant, to anyone who can reach it")
        redis = await make_client(settings)  # one server, a cluster, or Sentinel's primary
        store = Store(redis, idempotency_ttl_s=settings.idempotency_ttl_s,
                      lock_timeout_s=settings.lock_timeout_s,
                      min_replicas_ack=settings.redis_min_replicas_ack,
                      wait_timeout_s=settings.redis_wait_timeout_s,
                      pool_timeout_s=settings.redis_timeout_s)
        app.state.settings = settings
        app.state.store = store
        app.state.engine = Engine(store, settings)
        app.state.sync_rounds = SyncRounds(app.state.engine)
        app.state.sessions = Sessions(app.state.engine)
        try:
            yield
        finally:
            await app.state.sync_rounds.notifier.close()
            await close_client(redis)

    app = FastAPI(
        title="optserve",
        version=__version__,
        summary="RMSprop, AdaGrad and SGD as a service, exactly as torch.optim computes them.",
        lifespan=lifespan,
    )
    problems.install(app)  # domain errors (SessionBusy, StoreConflict, ...) included
    app.include_router(ops.router)
    app.include_router(sessions.router)
    app.include_router(tensors.router)
    app.add_middleware(MetricsMiddleware)
    return app


def app_factory() -> FastAPI:
    """For `uvicorn optserve.app:app_factory --factory` (settings from the environment)."""
    return create_app()
