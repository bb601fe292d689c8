"""The ASGI application: routes, error handling, observability and the lifespan-managed Redis
client."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from . import __version__, logs, metrics, startup, tracing
from .api import openapi, ops, problems, sessions, tensors
from .api.bodies import BodyBudget, BodyLimits
from .api.body_pool import BodyPool
from .api.hot_route import HotStepRoute
from .api.observability import ObservabilityMiddleware
from .api.step_path import KnownSessions, StepFastPath
from .engine import Engine
from .rounds import SyncRounds
from .sessions import Sessions
from .settings import Settings
from .startup import load_settings
from .store.clients import close_client, make_client
from .store.redis_store import Store

log = logging.getLogger("optserve")
POOL_BYTES = 64 * 1024 * 1024


class OptserveApp(FastAPI):
    """FastAPI, with the hot step (api/hot_route.py) in front of its whole middleware stack."""

    hot: HotStepRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hot is not None:
            await self.hot(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        startup.check(settings)  # refuse to start (ConfigError) rather than answer 500s
        if not settings.redis_given:
            raise RuntimeError("no Redis is named (OPTSERVE_REDIS_URL, _CLUSTER_NODES or "
                               "_SENTINELS); `optserve serve` starts one of its own then")
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
            if metrics.multiproc_dir() is not None:  # its live gauges stop counting
                from prometheus_client import multiprocess

                # Gone already when the supervisor removed the directory first.
                with contextlib.suppress(FileNotFoundError):
                    multiprocess.mark_process_dead(os.getpid())

    app = OptserveApp(
        **_own_tracing(),
        title="optserve",
        version=__version__,
        summary="RMSprop, AdaGrad and SGD as a service, exactly as torch.optim computes them.",
        lifespan=lifespan,
    )
    # Innermost: inside the ErrorBoundary that problems.install adds, like a route.
    known = KnownSessions()
    app.add_middleware(StepFastPath, root=app, known=known)
    problems.install(app)  # domain errors (SessionBusy, StoreConflict, ...) included
    app.include_router(ops.router)
    app.include_router(sessions.router)
    app.include_router(tensors.router)
    app.state.body_budget = BodyBudget(settings.max_inflight_body_bytes)
    # Kept between requests (a cache of mapped pages): a quarter of the budget, <= 64 MiB.
    app.state.body_pool = BodyPool(min(POOL_BYTES, settings.max_inflight_body_bytes // 4))
    app.add_middleware(BodyLimits, budget=app.state.body_budget,
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(ObservabilityMiddleware, settings=settings)
    # In front of everything, Starlette's own error middleware included: see hot_route.py.
    app.hot = HotStepRoute(partial(FastAPI.__call__, app), root=app, known=known)
    openapi.install(app)  # the document, completed from the contract (spec.PROBLEMS, headers)
    return app


def _own_tracing() -> dict[str, Any]:
    """FastAPI >= 0.165 makes server spans of its own when a tracer provider is set; ours
    (api/observability.py, on any FastAPI) carry the request id and route, so theirs are off."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False}}
    return {}


def app_factory() -> FastAPI:
    """For `uvicorn optserve.app:app_factory --factory` (settings from the environment; an
    invalid one is a ConfigError naming its variable): also this process's log format and,
    when ``OTEL_*`` asks for it, its tracer provider."""
    settings = load_settings()
    logs.configure(settings)
    tracing.setup()
    return create_app(settings)
