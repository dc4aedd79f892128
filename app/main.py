"""The FastAPI application. Every route is reachable from the routers included here."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from app.api.deps import current_project, forwarded_project
from app.api.errors import install_error_handlers
from app.api.idempotency import install_replay_handler
from app.api.json_bodies import install_json_body_guard
from app.api.replicas import ReplicaPool
from app.api.request_id import install_request_ids
from app.api.routes import completions, dashboard, files, fine_tuning, forwarding, health, models, tokenization
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker
from app.inference import InferenceEngine
from app.jobs.broker import JobDispatcher
from app.jobs.reconcile import reconcile
from app.ml.registry import BaseModelRegistry
from app.services.rate_limits import RateLimiter
from app.storage import Storage, StorageUnavailable, open_storage

log = logging.getLogger(__name__)
# Temporary upload files untouched this long belong to a writer that died (any live upload writes more often).
STALE_TEMP_SECONDS = 600.0


def _reconcile_once(factory: sessionmaker[Session], dispatcher: JobDispatcher, settings: Settings) -> None:
    try:
        reconcile(factory, dispatcher, settings)
    except Exception:  # a database that is down now: workers reconcile on their own schedule once it is back
        log.warning("start-up reconciliation skipped: the database is not reachable", exc_info=True)


def _remove_interrupted_uploads(storage: Storage) -> None:
    try:
        removed = storage.remove_stale_temp_files(STALE_TEMP_SECONDS)
        if removed:
            log.info("removed %d temporary file(s) left by interrupted uploads", removed)
    except StorageUnavailable:  # the store is down now: serve what needs no blob; the next start cleans up
        log.warning("start-up clean-up of interrupted uploads skipped: blob storage is not answering")


def create_app(settings: Settings | None = None, *, role: Literal["api", "inference"] = "api") -> FastAPI:
    """The API (`tuneserve serve`: every route; inference in this process, or forwarded to
    `settings.inference_replicas`), or an inference replica (`tuneserve inference`: the inference routes, for
    requests the API forwards)."""
    settings = settings or get_settings()
    forwards = role == "api" and bool(settings.inference_replicas)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Long-lived objects live on app.state and are reached through app/api/deps.py.
        app.state.settings = settings
        app.state.engine = make_engine(
            settings.database_url_resolved,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        app.state.sessionmaker = make_sessionmaker(app.state.engine)
        app.state.storage = open_storage(settings)
        if role == "api":  # uploads and jobs are the API's; a replica only reads adapters
            _remove_interrupted_uploads(app.state.storage)
        app.state.registry = BaseModelRegistry(settings)
        app.state.dispatcher = JobDispatcher(settings)
        app.state.rate_limiter = RateLimiter(
            settings.rate_limit_requests_per_minute, settings.rate_limit_tokens_per_minute
        )
        app.state.replicas = None
        if forwards:
            assert settings.internal_token is not None  # Settings refuses replicas without one
            app.state.replicas = ReplicaPool(settings.inference_replicas, settings.internal_token)
        app.state.inference = None
        if settings.inference == "on" and not forwards:
            app.state.inference = InferenceEngine(
                app.state.registry,
                max_batch_size=settings.max_batch_size,
                max_adapters=settings.max_resident_adapters,
                max_adapter_bytes=settings.max_adapter_cache_bytes,
                max_lora_rank=settings.max_lora_rank,
                max_waiting_per_owner=settings.max_waiting_per_project,
            )
            app.state.inference.start()
        # Re-drive what the broker may have lost while nothing was running; off the start-up path.
        reconciling = threading.Thread(
            target=_reconcile_once, args=(app.state.sessionmaker, app.state.dispatcher, settings), daemon=True
        )
        if role == "api":
            reconciling.start()
        yield
        if reconciling.is_alive():
            reconciling.join(timeout=10)  # it uses the engine disposed below
        if app.state.inference is not None:
            app.state.inference.stop()
        if app.state.replicas is not None:
            await app.state.replicas.close()
        app.state.dispatcher.close()
        app.state.engine.dispose()

    logging.basicConfig(level=settings.log_level.upper())
    # The docs are served by the dashboard's router, from assets that ship with the package (FastAPI's own load
    # them from a CDN: blank on a machine without internet).
    app = FastAPI(title="tuneserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_replay_handler(app)
    install_json_body_guard(app, max_bytes=settings.max_json_body_bytes, max_depth=settings.max_json_depth)
    install_request_ids(app)  # outermost: its id is on every answer, the guard's refusals included
    app.include_router(health.router)
    if role == "inference":
        app.dependency_overrides[current_project] = forwarded_project
        app.include_router(completions.router)
        return app
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(models.router)
    app.include_router(tokenization.router)
    app.include_router(forwarding.router if forwards else completions.router)
    app.include_router(dashboard.router)
    return app
