"""Shared fixtures. Everything that touches the database runs on Postgres and on SQLite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app import migrate
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.services import keys

# The shared Postgres of the dev and CI machines; each test session works in a database of its own.
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_conninfo() -> str:
    url = make_url(POSTGRES_ADMIN_URL)
    return f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"tuneserve_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        migrate.upgrade(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE projects RESTART IDENTITY CASCADE")
    engine.dispose()


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, max_upload_bytes=2 * 1024 * 1024)


@pytest.fixture
def sessionmaker(settings):
    engine = make_engine(settings.database_url_resolved)
    yield make_sessionmaker(engine)
    engine.dispose()


def make_key(sessionmaker, project: str) -> str:
    with session_scope(sessionmaker) as session:
        return keys.create_key(session, project)


@pytest.fixture
def app_client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def alpha_key(sessionmaker) -> str:
    return make_key(sessionmaker, "alpha")


@pytest.fixture
def beta_key(sessionmaker) -> str:
    return make_key(sessionmaker, "beta")


@pytest.fixture
def client(app_client, alpha_key) -> TestClient:
    app_client.headers["Authorization"] = f"Bearer {alpha_key}"
    return app_client
