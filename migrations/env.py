"""Alembic environment: the URL comes from the same Settings as the API and the worker, unless the caller
(app.migrate) passes a connection or URL explicitly."""

from alembic import context

from app.config import get_settings
from app.db import make_engine, normalise_url
from app.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url_resolved


def run_migrations_offline() -> None:
    context.configure(url=normalise_url(database_url()), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(database_url())  # the app's engine, so SQLite files get WAL mode from the start
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:
    # render_as_batch: SQLite can only alter tables by copying them; batch mode does that for us.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
