"""Alembic migrations of the evidence store, on real SQLite files."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import CheckConstraint, Engine, ForeignKeyConstraint, event, inspect
from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

from server.store import Store
from server.store.engine import alembic_config, create_store_engine, upgrade_to_head
from server.store.schema import Base

STORE_TABLES = {
    "enrol_tokens",
    "agents",
    "keys",
    "envelopes",
    "gpu_windows",
    "processes",
    "gaps",
    "nonces",
}
SCHEMA_CHANGING = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'verifier.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = create_store_engine(url)
    yield engine
    engine.dispose()


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _statements_of_upgrade(engine: Engine) -> list[str]:
    statements: list[str] = []

    def capture(
        _conn: object,
        _cursor: DBAPICursor,
        statement: str,
        _parameters: object,
        _context: ExecutionContext | None,
        _executemany: bool,
    ) -> None:
        statements.append(statement.strip())

    event.listen(engine, "before_cursor_execute", capture)
    try:
        upgrade_to_head(engine)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return statements


def _current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_open_migrates_an_empty_database_to_head(url: str, engine: Engine) -> None:
    Store.open(url).close()

    assert _tables(engine) == STORE_TABLES | {"alembic_version"}
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    assert _current_revision(engine) == head


def test_upgrading_a_current_database_changes_nothing(engine: Engine) -> None:
    first = _statements_of_upgrade(engine)
    second = _statements_of_upgrade(engine)

    # The capture works (the first run did build the schema)...
    assert any(statement.upper().startswith("CREATE TABLE") for statement in first)
    # ...and the second run only read the version table.
    assert [s for s in second if s.upper().startswith(SCHEMA_CHANGING)] == []


def test_a_second_open_keeps_the_data(url: str) -> None:
    with Store.open(url) as store:
        store.add_enrol_token(b"\x01" * 32, "", expires_unix_ns=10, now_unix_ns=1)
    with Store.open(url) as store:
        store.enroll(b"\x01" * 32, "host", "agent", b"key", "key-id", now_unix_ns=2)
        assert store.key("key-id") is not None


def test_models_and_migrations_agree(engine: Engine) -> None:
    upgrade_to_head(engine)

    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)

    assert differences == []


def test_constraint_names_match_the_models(engine: Engine) -> None:
    # Autogenerate ignores CHECK constraints and foreign-key names; compare those by name.
    upgrade_to_head(engine)
    inspector = inspect(engine)

    for table in Base.metadata.sorted_tables:
        modelled_checks = {str(c.name) for c in table.constraints if isinstance(c, CheckConstraint)}
        modelled_foreign_keys = {
            str(c.name) for c in table.constraints if isinstance(c, ForeignKeyConstraint)
        }
        migrated_checks = {c["name"] for c in inspector.get_check_constraints(table.name)}
        migrated_foreign_keys = {c["name"] for c in inspector.get_foreign_keys(table.name)}
        assert migrated_checks == modelled_checks, table.name
        assert migrated_foreign_keys == modelled_foreign_keys, table.name


def test_downgrade_to_base_and_upgrade_again(engine: Engine) -> None:
    upgrade_to_head(engine)
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")

    assert _tables(engine) == {"alembic_version"}
    upgrade_to_head(engine)
    assert _tables(engine) >= STORE_TABLES


def test_two_verifiers_opening_a_new_database_at_once(url: str, engine: Engine) -> None:
    start = threading.Barrier(2)

    def open_and_close() -> None:
        start.wait()
        Store.open(url).close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(open_and_close) for _ in range(2)]:
            future.result()

    assert _tables(engine) == STORE_TABLES | {"alembic_version"}
