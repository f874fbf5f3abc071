"""Retention of stored GPU windows, and PostgreSQL's day partitions of them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from server.records import AcceptedEnvelope, GpuVerdict
from server.store import Store
from server.store import retention as retention_module
from server.store.engine import create_store_engine
from server.store.maintain import main
from server.store.retention import (
    DAY_NS,
    MaintenanceReport,
    create_window_partitions,
    day_start,
    partition_day,
    partition_name,
    retention_cutoff,
)
from server.store.schema import DEFAULT_WINDOW_PARTITION
from tests.server.window_counters import windows_counted

SECOND = 1_000_000_000
HOUR = 3600 * SECOND
DAY0 = 20_000 * DAY_NS  # 2024-10-04T00:00Z: a synthetic "today"
NOW = DAY0 + 15 * HOUR


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_store_url")
        return url
    return f"sqlite:///{tmp_path / 'evidence.db'}"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url) as opened:
        token = hashlib.sha256(b"token-a").digest()
        opened.add_enrol_token(token, "host-a", NOW + HOUR, NOW)
        opened.enroll(token, "host-a", "agent-a", b"public-key-a", "key-a", NOW)
        yield opened


@pytest.fixture
def postgres_store(postgres_store_url: str) -> Iterator[Store]:
    with Store.open(postgres_store_url) as opened:
        token = hashlib.sha256(b"token-a").digest()
        opened.add_enrol_token(token, "host-a", NOW + HOUR, NOW)
        opened.enroll(token, "host-a", "agent-a", b"public-key-a", "key-a", NOW)
        yield opened


def _envelope(
    sequence: int, start: int, gpus: int = 2, agent_id: str = "agent-a"
) -> AcceptedEnvelope:
    body = f"envelope {agent_id}/{sequence}".encode()
    digest = hashlib.sha256(body).digest()
    return AcceptedEnvelope(
        agent_id=agent_id,
        sequence=sequence,
        envelope=body,
        envelope_sha256=digest,
        chain_head_sha256=digest,
        payload_type="application/vnd.gpuattest.evidence.v1+protobuf",
        received_unix_ns=start + 11 * SECOND,
        window_start_unix_ns=start,
        window_end_unix_ns=start + 10 * SECOND,
        source="synthetic-replay",
        nonce=b"",
        gpus=tuple(
            GpuVerdict(
                gpu_index=index,
                gpu_uuid=f"GPU-synthetic-{index}",
                start_unix_ns=start,
                end_unix_ns=start + 10 * SECOND,
                sample_count=100,
                features={"power_mean_w": 300.0},
                verdict="training",
                confidence=0.9,
                model_version="model-test-1",
            )
            for index in range(gpus)
        ),
    )


def _store_days(store: Store, starts: list[int]) -> None:
    store.store_accepted([_envelope(n + 1, start) for n, start in enumerate(starts)])


def _window_starts(store: Store) -> list[int]:
    return sorted({w.start_unix_ns for w in store.list_windows(limit=100_000)})


def _enrol_agent_b(store: Store) -> None:
    token = hashlib.sha256(b"token-b").digest()
    store.add_enrol_token(token, "host-b", NOW + HOUR, NOW)
    store.enroll(token, "host-b", "agent-b", b"public-key-b", "key-b", NOW)


def _partition_counts(url: str) -> dict[str, int]:
    """Rows per partition of gpu_windows, read with a plain engine."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT c.relname, (SELECT count(*) FROM gpu_windows w "
                    "WHERE w.tableoid = c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'gpu_windows'::regclass"
                )
            )
            return {str(name): int(count) for name, count in rows}
    finally:
        engine.dispose()


# -- day arithmetic ------------------------------------------------------------------------------


def test_day_start_and_cutoff_are_utc_days() -> None:
    assert day_start(NOW) == DAY0
    assert day_start(DAY0) == DAY0
    assert retention_cutoff(NOW, 1) == DAY0 - DAY_NS
    assert retention_cutoff(DAY0, 30) == DAY0 - 30 * DAY_NS
    assert partition_name(DAY0) == "gpu_windows_p20241004"


@given(st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(9999, 1, 1)))
def test_partition_names_round_trip(moment: dt.datetime) -> None:
    day = day_start(int(moment.replace(tzinfo=dt.UTC).timestamp()) * SECOND)

    assert partition_day(partition_name(day)) == day


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(DEFAULT_WINDOW_PARTITION, id="default-partition"),
        pytest.param("gpu_windows", id="the-parent"),
        pytest.param("gpu_windows_p2024100", id="seven-digits"),
        pytest.param("gpu_windows_p20241004_old", id="suffix"),
    ],
)
def test_other_tables_are_no_day_partitions(name: str) -> None:
    assert partition_day(name) is None


@pytest.mark.parametrize(
    ("retention_days", "days_ahead", "error"),
    [
        pytest.param(0, 7, "retention_days", id="zero-retention"),
        pytest.param(-3, 7, "retention_days", id="negative-retention"),
        pytest.param(None, -1, "days_ahead", id="negative-days-ahead"),
    ],
)
def test_maintenance_refuses_bad_settings(
    store: Store, retention_days: int | None, days_ahead: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        store.maintain_windows(NOW, retention_days, days_ahead)


# -- retention on both databases ------------------------------------------------------------------


def test_retention_drops_windows_before_the_cutoff_day_and_keeps_the_rest(store: Store) -> None:
    starts = [DAY0 - 3 * DAY_NS, DAY0 - 2 * DAY_NS + HOUR, DAY0 - DAY_NS, DAY0 + HOUR]
    _store_days(store, starts)
    store.maintain_windows(NOW)  # partitions exist first (PostgreSQL): drop them, not rows

    store.maintain_windows(NOW, retention_days=1)

    assert _window_starts(store) == [DAY0 - DAY_NS, DAY0 + HOUR]
    # The signed envelopes stay: retention covers the per-GPU windows only.
    assert store.count_envelopes() == len(starts)


def test_retention_takes_what_it_removes_off_each_agents_counter(
    store: Store, store_url: str
) -> None:
    _enrol_agent_b(store)
    store.store_accepted(
        [
            _envelope(1, DAY0 - 3 * DAY_NS, gpus=2),
            _envelope(2, DAY0 - DAY_NS, gpus=2),
            _envelope(3, DAY0 + HOUR, gpus=2),
            _envelope(1, DAY0 - 3 * DAY_NS + HOUR, gpus=3, agent_id="agent-b"),
            _envelope(2, DAY0 + 2 * HOUR, gpus=1, agent_id="agent-b"),
        ]
    )
    store.maintain_windows(NOW)  # partitions first (PostgreSQL): dropped, not deleted from
    # A late window of a day with no partition: PostgreSQL's default partition holds it.
    store.store_accepted([_envelope(3, DAY0 - 5 * DAY_NS, gpus=4, agent_id="agent-b")])
    assert windows_counted(store_url) == {"agent-a": 6, "agent-b": 8}

    store.maintain_windows(NOW, retention_days=1)

    assert windows_counted(store_url) == {"agent-a": 4, "agent-b": 1}
    # Resending envelopes whose windows retention removed stores and counts nothing.
    assert store.store_accepted([_envelope(1, DAY0 - 3 * DAY_NS, gpus=2)]) == 0
    assert windows_counted(store_url) == {"agent-a": 4, "agent-b": 1}


def test_without_retention_nothing_is_removed(store: Store) -> None:
    starts = [DAY0 - 400 * DAY_NS, DAY0 + HOUR]
    _store_days(store, starts)

    report = store.maintain_windows(NOW)

    assert _window_starts(store) == starts
    assert (report.partitions_dropped, report.windows_deleted) == ((), 0)


def test_retention_is_idempotent(store: Store) -> None:
    _store_days(store, [DAY0 - 5 * DAY_NS, DAY0 + HOUR])
    store.maintain_windows(NOW, retention_days=2)

    again = store.maintain_windows(NOW, retention_days=2)

    assert (again.partitions_dropped, again.windows_deleted) == ((), 0)
    assert _window_starts(store) == [DAY0 + HOUR]


def test_sqlite_deletes_in_batches_until_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention_module, "SQLITE_DELETE_BATCH", 3)
    with Store.open(f"sqlite:///{tmp_path / 'evidence.db'}") as store:
        token = hashlib.sha256(b"t").digest()
        store.add_enrol_token(token, "", NOW + HOUR, NOW)
        store.enroll(token, "host-a", "agent-a", b"pk", "key-a", NOW)
        _store_days(store, [DAY0 - 9 * DAY_NS + n * HOUR for n in range(5)] + [DAY0])

        report = store.maintain_windows(NOW, retention_days=1)

        assert report == MaintenanceReport(windows_deleted=10)
        assert _window_starts(store) == [DAY0]
        assert [agent.windows_stored for agent in store.list_agents()] == [2]


# -- PostgreSQL partitions -----------------------------------------------------------------------


def test_maintenance_creates_today_and_the_days_ahead_once(
    postgres_store: Store, postgres_store_url: str
) -> None:
    first = postgres_store.maintain_windows(NOW, days_ahead=2)
    second = postgres_store.maintain_windows(NOW, days_ahead=2)

    expected = tuple(partition_name(DAY0 + n * DAY_NS) for n in range(3))
    assert first.partitions_created == expected
    assert second == MaintenanceReport()
    assert set(_partition_counts(postgres_store_url)) == {DEFAULT_WINDOW_PARTITION, *expected}


def test_windows_without_a_partition_wait_in_the_default_one_then_move(
    postgres_store: Store, postgres_store_url: str
) -> None:
    old_day = DAY0 - 10 * DAY_NS
    _store_days(postgres_store, [old_day + HOUR, old_day + 2 * HOUR, DAY0 + HOUR])
    assert _partition_counts(postgres_store_url) == {DEFAULT_WINDOW_PARTITION: 6}

    report = postgres_store.maintain_windows(NOW, days_ahead=0)

    assert report.partitions_created == (partition_name(old_day), partition_name(DAY0))
    assert _partition_counts(postgres_store_url) == {
        DEFAULT_WINDOW_PARTITION: 0,
        partition_name(old_day): 4,
        partition_name(DAY0): 2,
    }
    assert len(postgres_store.list_windows()) == 6


def test_new_windows_go_straight_to_their_day_partition(
    postgres_store: Store, postgres_store_url: str
) -> None:
    postgres_store.maintain_windows(NOW, days_ahead=1)

    _store_days(postgres_store, [DAY0 + HOUR, DAY0 + DAY_NS + HOUR])

    counts = _partition_counts(postgres_store_url)
    assert counts[partition_name(DAY0)] == 2
    assert counts[partition_name(DAY0 + DAY_NS)] == 2
    assert counts[DEFAULT_WINDOW_PARTITION] == 0


def test_retention_drops_whole_partitions_and_old_rows_of_the_default_one(
    postgres_store: Store, postgres_store_url: str
) -> None:
    _store_days(postgres_store, [DAY0 - 3 * DAY_NS, DAY0 - DAY_NS, DAY0 + HOUR])
    postgres_store.maintain_windows(NOW, days_ahead=0)
    # A late window for a day whose partition is gone lands in the default partition.
    postgres_store.store_accepted([_envelope(9, DAY0 - 5 * DAY_NS)])

    report = postgres_store.maintain_windows(NOW, retention_days=1, days_ahead=0)

    assert report.partitions_dropped == (partition_name(DAY0 - 3 * DAY_NS),)
    assert report.windows_deleted == 2
    assert report.partitions_created == ()
    assert _window_starts(postgres_store) == [DAY0 - DAY_NS, DAY0 + HOUR]
    assert set(_partition_counts(postgres_store_url)) == {
        DEFAULT_WINDOW_PARTITION,
        partition_name(DAY0 - DAY_NS),
        partition_name(DAY0),
    }


def test_partitions_are_created_only_for_day_starts(postgres_store_url: str) -> None:
    engine = create_store_engine(postgres_store_url)
    try:
        with pytest.raises(ValueError, match="start of a UTC day"):
            create_window_partitions(engine, [DAY0 + HOUR])
    finally:
        engine.dispose()


# -- command line ----------------------------------------------------------------------------------


def test_the_command_prints_what_it_changed(store_url: str) -> None:
    Store.open(store_url).close()

    outcome = CliRunner().invoke(main, [store_url, "--retention-days", "30", "--days-ahead", "1"])

    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert set(report) == {"partitions_created", "partitions_dropped", "windows_deleted"}
    expected_partitions = 2 if store_url.startswith("postgresql") else 0
    assert len(report["partitions_created"]) == expected_partitions
