"""A Postgres database of a benchmark's own on the local server, and API keys in it: made fresh for one run, and
dropped after it whatever happens, so runs never see each other's jobs or models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """Yields the URL of a new, migrated database named `{prefix}_<random>`."""
    from app import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def project_key(database_url: str, project: str) -> tuple[str, str]:
    """(a new API key of `project`, the project's id), creating the project if needed."""
    from app.db import make_engine, make_sessionmaker, session_scope
    from app.services.keys import create_key
    from app.tables import Project

    engine = make_engine(database_url)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            key = create_key(session, project)
            project_id = session.query(Project.id).filter_by(name=project).scalar()
    finally:
        engine.dispose()
    return key, project_id
