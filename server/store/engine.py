"""Engines for the evidence store, and running its migrations to head.

SQLite needs three things SQLAlchemy leaves to the application: WAL journaling (readers
never block the writer), foreign keys switched on, and a busy timeout so concurrent writers
queue instead of failing. Python 3.11's sqlite3 module also starts transactions lazily (only
before DML), which makes reads inside a transaction unrepeatable and DDL non-transactional;
the hooks below take BEGIN over, as the SQLAlchemy SQLite documentation recommends, and
make write transactions ``BEGIN IMMEDIATE`` so a writer holds the lock from its first read.

PostgreSQL goes through psycopg 3 with a sized pool that pings a connection before lending
it (a restarted server leaves every pooled connection dead), connect and TCP timeouts so a
vanished server fails a call instead of hanging it, and a migration lock so verifier
replicas starting together migrate one after the other.

On both, errors that mean "try again later" (server unreachable, connection lost, deadlock,
SQLite still locked) surface as :class:`server.store.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL, ExceptionContext
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

from server.store.errors import StoreUnavailableError

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option marking connections that will write; see writer_engine().
_WRITE_OPTION = "gpuattest_store_write"
# pg_advisory_xact_lock key held while migrating ("gpuattest" in a 64-bit integer's worth).
MIGRATION_LOCK_KEY = 0x67707561_74746573
# SQLSTATE classes worth retrying: 08 connection exception, 40 transaction rollback
# (deadlock, serialisation failure), 53 insufficient resources (too many connections, disk
# full), 57P admin/crash shutdown and "cannot connect now" (starting up), 55P03 a lock not
# granted within lock_timeout (only maintenance sets one; see server.store.retention).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P", "55P03")
# How long a dead peer may keep a PostgreSQL socket silent before the call fails (ms, s).
_TCP_USER_TIMEOUT_MS = 30_000
_KEEPALIVE_IDLE_S = 10
_KEEPALIVE_INTERVAL_S = 5
_KEEPALIVE_COUNT = 3


@dataclass(frozen=True)
class PoolOptions:
    """How many connections one store keeps, and how long a call waits for the database."""

    size: int = 10  # connections kept open
    max_overflow: int = 10  # extra connections opened under load, closed when returned
    timeout_s: float = 10.0  # wait for a free pooled connection before failing
    connect_timeout_s: int = 5  # PostgreSQL: give up connecting after this long (min 2)


def database_url(url: str) -> URL:
    """Parse ``url``; plain ``postgresql://`` (or ``postgres://``) means the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_store_engine(url: str, pool: PoolOptions | None = None) -> Engine:
    """Return an engine for ``url``, configured for its database (SQLite or PostgreSQL)."""
    pool = pool or PoolOptions()
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    options: dict[str, Any] = {}
    if backend == "postgresql":
        options = _postgresql_options(pool)
    elif backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        options = _pool_sizes(pool)
    engine = create_engine(parsed, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
    event.listen(engine, "handle_error", _unavailable_when_transient, retval=True)
    return engine


def _pool_sizes(pool: PoolOptions) -> dict[str, Any]:
    return {
        "pool_size": pool.size,
        "max_overflow": pool.max_overflow,
        "pool_timeout": pool.timeout_s,
    }


def _postgresql_options(pool: PoolOptions) -> dict[str, Any]:
    connect_args = {
        "connect_timeout": max(2, pool.connect_timeout_s),  # libpq's minimum
        "application_name": "gpuattest-verifier",
        # A peer that vanished without closing (power loss, partition) is noticed by TCP.
        "keepalives": 1,
        "keepalives_idle": _KEEPALIVE_IDLE_S,
        "keepalives_interval": _KEEPALIVE_INTERVAL_S,
        "keepalives_count": _KEEPALIVE_COUNT,
        "tcp_user_timeout": _TCP_USER_TIMEOUT_MS,
    }
    return {**_pool_sizes(pool), "pool_pre_ping": True, "connect_args": connect_args}


def _unavailable_when_transient(context: ExceptionContext) -> BaseException | None:
    # The pool's pre-ping expects the driver's own error so it can reconnect quietly.
    if context.is_pre_ping:
        return None
    error = context.original_exception
    if context.is_disconnect or _is_transient(context, error):
        return StoreUnavailableError(f"database unavailable ({context.dialect.name}): {error}")
    return None


def _is_transient(context: ExceptionContext, error: BaseException) -> bool:
    if context.dialect.name == "sqlite":
        message = str(error)
        return isinstance(error, sqlite3.OperationalError) and (
            "locked" in message or "busy" in message
        )
    dbapi = context.dialect.loaded_dbapi
    if not isinstance(error, dbapi.Error):
        return False
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None:
        # No server answer at all: refused, reset or timed out while connecting or reading.
        return isinstance(error, dbapi.OperationalError)
    return str(sqlstate).startswith(_TRANSIENT_SQLSTATE_PREFIXES)


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
        if connection.dialect.name == "postgresql":
            # Replicas starting at once would otherwise race to create the same tables;
            # the lock ends with this transaction, after which the others find head.
            lock = text("SELECT pg_advisory_xact_lock(:key)")
            connection.execute(lock, {"key": MIGRATION_LOCK_KEY})
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
