"""The long-lived objects of a worker process (settings, database, storage, base models, dispatcher)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker
from app.jobs.broker import JobDispatcher
from app.ml.registry import BaseModelRegistry
from app.storage import Storage, open_storage


@dataclass
class WorkerContext:
    settings: Settings
    sessionmaker: sessionmaker[Session]
    storage: Storage
    registry: BaseModelRegistry
    dispatcher: JobDispatcher


def build_context(settings: Settings) -> WorkerContext:
    return WorkerContext(
        settings=settings,
        sessionmaker=make_sessionmaker(make_engine(settings.database_url_resolved)),
        storage=open_storage(settings),
        registry=BaseModelRegistry(settings),
        dispatcher=JobDispatcher(settings),
    )


@lru_cache
def worker_context() -> WorkerContext:
    return build_context(get_settings())
