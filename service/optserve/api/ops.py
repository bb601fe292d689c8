"""Operations endpoints: liveness, readiness, metrics. They need no API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..metrics import REGISTRY
from .deps import StoreDep
from .problems import Problem, store_unavailable

router = APIRouter(tags=["operations"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep) -> dict[str, str]:
    try:
        await store.ping()
    except Exception as exc:  # any failure to answer means not ready
        raise store_unavailable(exc) from None
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


__all__ = ["Problem", "router"]
