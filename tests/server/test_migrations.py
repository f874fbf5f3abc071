"""Alembic migrations of the evidence store, on real SQLite files and a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    CheckConstraint,
    Engine,
    ForeignKeyConstraint,
    MetaData,
    Table,
    event,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

from server.records import AcceptedEnvelope, GpuVerdict
from server.store import Store
from server.store.engine import alembic_config, create_store_engine, upgrade_to_head
from server.store.retention import DAY_NS, create_window_partitions, partition_name
from server.store.schema import (
    DEFAULT_WINDOW_PARTITION,
    Base,
    include_in_autogenerate,
    is_window_partition,
)

STORE_TABLES = {
    "enrol_tokens",
    "agents",
    "keys",
    "envelopes",
    "gpu_windows",
    "processes",
    "gaps",
    "nonces",
    "feature_layouts",
}
# Tables before 0003 added feature_layouts.
TABLES_BEFORE_0003 = STORE_TABLES - {"feature_layouts"}
SCHEMA_CHANGING = ("CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE")
DAY0 = 20_000 * DAY_NS  # 2024-10-04T00:00Z, a synthetic time


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or one on the session's PostgreSQL server."""
    if request.param == "postgresql":
        postgres_url: str = request.getfixturevalue("postgres_url")
        return postgres_url
    return f"sqlite:///{tmp_path / 'verifier.db'}"


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = create_store_engine(url)
    yield engine
    engine.dispose()


def _tables(engine: Engine) -> set[str]:
    """Every table but gpu_windows' partitions (PostgreSQL's own business, tested apart)."""
    return {name for name in inspect(engine).get_table_names() if not is_window_partition(name)}


def _migrate(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, revision)


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


def _primary_key(engine: Engine, table: str) -> list[str]:
    columns: list[str] = inspect(engine).get_pk_constraint(table)["constrained_columns"]
    return columns


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
        context = MigrationContext.configure(conn, opts={"include_name": include_in_autogenerate})
        differences = compare_metadata(context, Base.metadata)

    assert differences == []
    # The hook hides gpu_windows' partitions and nothing else.
    hidden = set(inspect(engine).get_table_names()) - _tables(engine)
    expected = {DEFAULT_WINDOW_PARTITION} if engine.dialect.name == "postgresql" else set()
    assert hidden == expected


def test_constraint_names_match_the_models(engine: Engine) -> None:
    # Autogenerate ignores CHECK constraints, foreign-key names and primary keys; compare
    # those by name (and keys by columns).
    upgrade_to_head(engine)
    inspector = inspect(engine)

    for table in Base.metadata.sorted_tables:
        modelled_checks = {str(c.name) for c in table.constraints if isinstance(c, CheckConstraint)}
        modelled_foreign_keys = {
            str(c.name) for c in table.constraints if isinstance(c, ForeignKeyConstraint)
        }
        migrated_checks = {c["name"] for c in inspector.get_check_constraints(table.name)}
        migrated_foreign_keys = {c["name"] for c in inspector.get_foreign_keys(table.name)}
        migrated_key = inspector.get_pk_constraint(table.name)
        assert migrated_checks == modelled_checks, table.name
        assert migrated_foreign_keys == modelled_foreign_keys, table.name
        assert migrated_key["name"] == table.primary_key.name, table.name
        assert migrated_key["constrained_columns"] == [c.name for c in table.primary_key.columns]


def test_downgrade_to_base_and_upgrade_again(engine: Engine) -> None:
    upgrade_to_head(engine)
    _migrate(engine, "base", down=True)

    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
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


# -- 0002: gpu_windows keyed by start time too, and partitioned by it on PostgreSQL -------------


def _window_rows(days: int) -> list[dict[str, Any]]:
    """Two GPUs per envelope, one envelope per day from DAY0 (synthetic)."""
    return [
        {
            "agent_id": "agent-a",
            "sequence": day + 1,
            "gpu_index": gpu,
            "gpu_uuid": f"GPU-synthetic-{gpu}",
            "start_unix_ns": DAY0 + day * DAY_NS + 3600 * 10**9,
            "end_unix_ns": DAY0 + day * DAY_NS + 3610 * 10**9,
            "sample_count": 100,
            "verdict": "training",
            "confidence": 0.5,
            "model_version": "model-test-1",
            "features_json": '{"power_mean_w": 250.0}',
        }
        for day in range(days)
        for gpu in range(2)
    ]


def _insert_windows(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Insert rows the way revision 0001 knew them, with the parents they need."""
    metadata = MetaData()
    agents, envelopes, windows = (
        Table(name, metadata, autoload_with=engine)
        for name in ("agents", "envelopes", "gpu_windows")
    )
    agent = {
        "agent_id": "agent-a",
        "hostname": "host-a",
        "enrolled_unix_ns": 0,
        "acked_sequence": 0,
        "last_envelope_sha256": b"\x00" * 32,
        "last_seen_unix_ns": 0,
    }
    sequences = sorted({row["sequence"] for row in rows})
    envelope_rows = [
        {
            "agent_id": "agent-a",
            "sequence": sequence,
            "sha256": bytes(32),
            "payload_type": "test",
            "envelope": b"\x00\xff",
            "received_unix_ns": 0,
            "window_start_unix_ns": 0,
            "window_end_unix_ns": 0,
            "source": "synthetic",
            "nonce": b"",
        }
        for sequence in sequences
    ]
    with engine.begin() as conn:
        conn.execute(insert(agents), [agent])
        if rows:
            conn.execute(insert(envelopes), envelope_rows)
            conn.execute(insert(windows), rows)


def _stored_windows(engine: Engine) -> list[tuple[Any, ...]]:
    windows = Table("gpu_windows", MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        return sorted(tuple(row) for row in conn.execute(select(windows)))


def test_0002_keeps_the_windows_0001_stored(engine: Engine) -> None:
    _migrate(engine, "0001")
    rows = _window_rows(days=3)
    _insert_windows(engine, rows)
    before = _stored_windows(engine)

    _migrate(engine, "0002")

    assert _stored_windows(engine) == before
    assert len(before) == len(rows)
    assert _primary_key(engine, "gpu_windows") == [
        "agent_id",
        "sequence",
        "gpu_index",
        "start_unix_ns",
    ]


def test_downgrading_0002_merges_every_partition_back(url: str, engine: Engine) -> None:
    _migrate(engine, "0001")
    _insert_windows(engine, _window_rows(days=3))
    before = _stored_windows(engine)
    with Store.open(url) as store:
        # On PostgreSQL this spreads the rows over day partitions; on SQLite it does nothing.
        store.maintain_windows(DAY0, days_ahead=1)

    _migrate(engine, "0001", down=True)

    assert _stored_windows(engine) == before
    assert _primary_key(engine, "gpu_windows") == ["agent_id", "sequence", "gpu_index"]
    assert set(inspect(engine).get_table_names()) == TABLES_BEFORE_0003 | {"alembic_version"}


def test_postgresql_partitions_gpu_windows_by_start_time(postgres_url: str) -> None:
    Store.open(postgres_url).close()
    engine = create_store_engine(postgres_url)
    try:
        with engine.connect() as conn:
            strategy, key = conn.execute(
                text(
                    "SELECT p.partstrat, a.attname FROM pg_partitioned_table p "
                    "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0] "
                    "WHERE p.partrelid = 'gpu_windows'::regclass"
                )
            ).one()
            default = conn.execute(
                text(
                    "SELECT c.relname FROM pg_partitioned_table p "
                    "JOIN pg_class c ON c.oid = p.partdefid "
                    "WHERE p.partrelid = 'gpu_windows'::regclass"
                )
            ).scalar_one()
    finally:
        engine.dispose()

    assert (strategy, key) == ("r", "start_unix_ns")  # r: RANGE
    assert default == DEFAULT_WINDOW_PARTITION
    assert partition_name(DAY0) == "gpu_windows_p20241004"


# -- 0003: features packed under a layout of their names ---------------------------------------


def test_windows_stored_as_json_before_0003_read_the_same_after(url: str, engine: Engine) -> None:
    _migrate(engine, "0002")
    _insert_windows(engine, _window_rows(days=2))

    upgrade_to_head(engine)

    with Store.open(url) as store:
        windows = store.list_windows()
    assert [w.features for w in windows] == [{"power_mean_w": 250.0}] * 4


def _packed_envelope() -> AcceptedEnvelope:
    """An accepted envelope of agent-a (already in the database) with two synthetic GPUs."""
    features = {"util_gpu_mean_pct": 97.5, "busy_frac": 0.1 + 0.2, "energy_j": 1e-300}
    gpus = tuple(
        GpuVerdict(
            gpu, f"GPU-synthetic-{gpu}", DAY0, DAY0 + 10**10, 100, features, "idle", 0.5, "m"
        )
        for gpu in range(2)
    )
    return AcceptedEnvelope(
        "agent-a",
        1,
        b"\x01",
        bytes(32),
        bytes(32),
        "test",
        DAY0,
        DAY0,
        DAY0 + 10**10,
        "s",
        b"",
        gpus=gpus,
    )


def test_downgrading_0003_writes_packed_features_back_as_json(url: str, engine: Engine) -> None:
    _migrate(engine, "0002")
    _insert_windows(engine, [])  # the agent only
    upgrade_to_head(engine)
    with Store.open(url) as store:
        store.store_accepted([_packed_envelope()])

    _migrate(engine, "0002", down=True)

    windows = Table("gpu_windows", MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        stored = conn.execute(select(windows.c.features_json)).scalars().all()
    # As the verifier wrote them before 0003: keys sorted, floats exact.
    expected = '{"busy_frac": 0.30000000000000004, "energy_j": 1e-300, "util_gpu_mean_pct": 97.5}'
    assert stored == [expected, expected]
    assert "feature_layouts" not in inspect(engine).get_table_names()


# -- 0004: a per-agent counter of stored windows ------------------------------------------------


def _agent_columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("agents")}


def test_0004_backfills_each_agents_window_counter(engine: Engine) -> None:
    _migrate(engine, "0003")
    _insert_windows(engine, _window_rows(days=3))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO agents (agent_id, hostname, enrolled_unix_ns, acked_sequence, "
                "last_envelope_sha256, last_seen_unix_ns) VALUES ('agent-b', 'host-b', 0, 0, "
                ":genesis, 0)"
            ),
            {"genesis": bytes(32)},
        )
    if engine.dialect.name == "postgresql":
        # Two days' rows move to their partitions; the third day's stay in the default one.
        create_window_partitions(engine, [DAY0, DAY0 + DAY_NS])

    _migrate(engine, "0004")

    with engine.connect() as conn:
        counters = conn.execute(text("SELECT agent_id, windows_stored FROM agents")).all()
    assert sorted(tuple(row) for row in counters) == [("agent-a", 6), ("agent-b", 0)]


def test_0004_counts_on_from_the_backfill_and_its_downgrade_drops_the_counter(
    url: str, engine: Engine
) -> None:
    _migrate(engine, "0003")
    _insert_windows(engine, [])  # the agent only
    with Store.open(url) as store:
        store.store_accepted([_packed_envelope()])
        [agent] = store.list_agents()
    assert agent.windows_stored == 2

    _migrate(engine, "0003", down=True)

    assert "windows_stored" not in _agent_columns(engine)
    assert _stored_windows(engine) != []  # the windows stay
