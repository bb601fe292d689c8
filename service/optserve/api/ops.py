"""Operations endpoints: liveness, readiness, metrics. They need no API key (metrics may
need the metrics key)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import DomainError
from . import scrape
from .deps import SettingsDep, StoreDep
from .problems import Problem, store_unavailable

router = APIRouter(tags=["operations"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep) -> dict[str, str]:
    """Ready when Redis takes a write (not only answers): full, read-only or moved is 503."""
    try:
        await store.check_writable()
    except DomainError as exc:  # store_full or store_unavailable: not ready either way
        raise Problem("store_unavailable", f"not ready: {exc.detail}",
                      headers={"Retry-After": str(exc.retry_after or 1)}) from None
    except Exception as exc:  # any failure to answer means not ready
        raise store_unavailable(exc) from None
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    """All workers' metrics (see api/scrape.py); behind OPTSERVE_METRICS_KEY when it is set,
    and not here at all when OPTSERVE_METRICS_PORT serves them."""
    if settings.metrics_port is not None:
        raise Problem("not_found", "metrics are served on OPTSERVE_METRICS_PORT")
    if not scrape.authorized(settings, request.headers.get("authorization")):
        raise Problem("unauthorized", "/metrics needs `Authorization: Bearer "
                      "<OPTSERVE_METRICS_KEY>`", headers={"WWW-Authenticate": "Bearer"})
    body = await anyio.to_thread.run_sync(scrape.generate, settings)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


__all__ = ["Problem", "router"]
