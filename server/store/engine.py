"""Engines for the evidence store, and running its migrations to head.

SQLite needs three things SQLAlchemy leaves to the application: WAL journaling (readers
never block the writer), foreign keys switched on, and a busy timeout so concurrent writers
queue instead of failing. Python 3.11's sqlite3 module also starts transactions lazily (only
before DML), which makes reads inside a transaction unrepeatable and DDL non-transactional;
the hooks below take BEGIN over, as the SQLAlchemy SQLite documentation recommends, and
make write transactions ``BEGIN IMMEDIATE`` so a writer holds the lock from its first read.
Every other database (PostgreSQL) is used as SQLAlchemy configures it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option marking connections that will write; see writer_engine().
_WRITE_OPTION = "gpuattest_store_write"


def create_store_engine(url: str) -> Engine:
    """Return an engine for ``url``, with the SQLite hooks installed when it is SQLite."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def writer_engine(engine: Engine) -> Engine:
    """Return a view of ``engine`` whose transactions take the write lock when they begin.

    On SQLite a deferred transaction that reads and then writes can fail with "database is
    locked" when another writer committed in between; taking the lock up front makes
    concurrent writers wait their turn (up to the busy timeout). Other databases ignore it.
    """
    return engine.execution_options(**{_WRITE_OPTION: True})


def upgrade_to_head(engine: Engine) -> None:
    """Run the alembic migrations to head in one write transaction; a no-op when current."""
    config = alembic_config()
    with writer_engine(engine).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def alembic_config() -> Config:
    """Alembic configuration built in code, so no alembic.ini is needed at runtime."""
    config = Config()
    # ConfigParser interpolates '%'; a path may contain one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    # Stop sqlite3 from emitting BEGIN itself; _begin_sqlite_transaction does it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        _switch_to_wal(cursor)
        # Accepted evidence must survive power loss once the commit returned (NORMAL
        # would let the last commits roll back).
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


@retry(
    retry=retry_if_exception(
        lambda error: isinstance(error, sqlite3.OperationalError) and "locked" in str(error)
    ),
    wait=wait_exponential(multiplier=0.005, max=0.25),
    stop=stop_after_delay(SQLITE_BUSY_TIMEOUT_MS / 1000),
    reraise=True,
)
def _switch_to_wal(cursor: Any) -> None:
    # WAL is stored in the file, but a brand-new file only records it at its first commit.
    # A second verifier connecting before that finds a rollback-journal file whose writer
    # holds the lock, and SQLite refuses the switch at once, without the busy handler;
    # retrying until the first writer committed settles it (the file is WAL by then).
    cursor.execute("PRAGMA journal_mode = WAL")


def _begin_sqlite_transaction(connection: Connection) -> None:
    writes = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")
