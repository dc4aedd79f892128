"""Liveness and readiness for orchestrators: /healthz says the process is up, /readyz that it can work."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from sqlalchemy import text
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.api.deps import InferenceDep, SessionDep
from app.api.errors import database_overloaded
from app.errors import ServiceUnavailable
from app.schemas.errors import ERROR_RESPONSES
from app.services import metrics as metrics_service

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:  # no I/O: answered on the event loop, no thread hop
    return {"status": "ok"}


@router.get("/readyz", responses={503: ERROR_RESPONSES[503]})
def readyz(session: SessionDep) -> dict:
    """503 `database_busy` when every connection is in use (overload: the database is fine, this process is
    saturated) and 503 `database_unavailable` when the database cannot be reached."""
    try:
        session.execute(text("SELECT 1"))
    except PoolTimeout:
        raise database_overloaded() from None
    except Exception as exc:
        raise ServiceUnavailable(f"database unreachable: {type(exc).__name__}", code="database_unavailable") from None
    return {"status": "ok", "database": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(session: SessionDep, engine: InferenceDep) -> PlainTextResponse:
    """Prometheus exposition: requests, tokens, batch sizes, adapter cache, queue depth, jobs by status."""
    return PlainTextResponse(
        metrics_service.render(session, engine.metrics() if engine else None),
        media_type="text/plain; version=0.0.4",
    )
