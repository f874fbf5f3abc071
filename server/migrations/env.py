"""Alembic environment for the verifier's evidence store.

At runtime :func:`server.store.engine.upgrade_to_head` hands in an open connection
(``config.attributes["connection"]``) and no alembic.ini is read. Developers can also run
the alembic command line with ``server/alembic.ini``, naming the database with
``-x url=sqlite:///path`` (or ``sqlalchemy.url`` in the ini file).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from server.store.engine import create_store_engine, writer_engine
from server.store.schema import Base, include_in_autogenerate

TARGET_METADATA = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass -x url=... or set sqlalchemy.url")
    return url


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=TARGET_METADATA,
        # gpu_windows' partitions belong to maintenance (server.store.retention), not models.
        include_name=include_in_autogenerate,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run_on(connection)
        return
    engine = create_store_engine(_database_url())
    try:
        with writer_engine(engine).connect() as owned_connection:
            _run_on(owned_connection)
    finally:
        engine.dispose()


def _run_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=TARGET_METADATA,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
