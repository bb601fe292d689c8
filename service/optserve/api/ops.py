"""Operations endpoints: liveness, readiness, metrics. They need no API key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import DomainError
from ..metrics import REGISTRY
from .deps import StoreDep
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
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


__all__ = ["Problem", "router"]
