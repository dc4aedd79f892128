"""Migrations go up and down on both databases, and the tables in code match them."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from app import migrate
from app.db import make_engine
from app.tables import Base
from tests.services import conninfo


@pytest.fixture(params=["postgres", "sqlite"])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    admin_url = request.getfixturevalue("postgres_admin_url")
    name = f"tuneserve_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(conninfo(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(conninfo(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db_url):
    migrate.upgrade(empty_db_url)
    assert table_names(empty_db_url) == set(Base.metadata.tables)
    migrate.downgrade(empty_db_url)
    assert table_names(empty_db_url) == set()
    migrate.upgrade(empty_db_url)
    assert table_names(empty_db_url) == set(Base.metadata.tables)


def test_tables_match_migrations(empty_db_url):
    migrate.upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []
