"""Time partitions and retention of stored GPU windows.

PostgreSQL keeps ``gpu_windows`` in one partition per UTC day (``gpu_windows_pYYYYMMDD``)
plus a default partition for windows no day partition covers yet, so that an insert never
fails for want of a partition. :func:`maintain_windows`, called periodically, creates the
partitions of the coming days (moving any rows the default partition holds for a day into
that day's new partition) and, when a retention is set, drops whole day partitions that
ended before the cutoff: no row-by-row delete, no table bloat. SQLite has no partitions;
there retention deletes the old rows in short batches so ingest is never locked out long.
Either way the agents' ``windows_stored`` counters drop by what each agent lost, in the
transaction that removes the windows.

Retention covers the per-GPU windows only. The signed envelopes (the evidence an auditor
verifies) and their process rows are kept: their key (agent, sequence) must stay unique
across verifier replicas, which a time-partitioned table cannot enforce. docs/storage.md
says more.

Run it by hand (or from cron) with ``python -m server.store.maintain URL --retention-days N``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, bindparam, text, update

from server.store.schema import DEFAULT_WINDOW_PARTITION, WINDOW_PARTITION_PREFIX, Agent

DAY_NS = 86_400 * 1_000_000_000
# Partitions are created this many days ahead of today, so a missed maintenance run or two
# never sends a day's windows to the default partition.
PARTITION_DAYS_AHEAD = 7
# SQLite deletes at most this many rows per transaction.
SQLITE_DELETE_BATCH = 5_000
# How long maintenance DDL may wait for a table lock before giving up this round. DDL on
# a partition waits for running queries; while it waits, every insert queues behind it.
LOCK_TIMEOUT = "2s"
_PARTITION_NAME = re.compile(re.escape(WINDOW_PARTITION_PREFIX) + r"(\d{8})")


@dataclass(frozen=True)
class MaintenanceReport:
    """What one maintenance run changed."""

    partitions_created: tuple[str, ...] = ()
    partitions_dropped: tuple[str, ...] = ()
    windows_deleted: int = 0  # rows deleted one by one (SQLite; PostgreSQL's default partition)


def day_start(unix_ns: int) -> int:
    """Start of the UTC day holding ``unix_ns``, in ns since the epoch."""
    return unix_ns - unix_ns % DAY_NS


def retention_cutoff(now_unix_ns: int, retention_days: int) -> int:
    """Windows starting before this are past retention: today and ``retention_days`` before it
    are kept in full, so every window is kept at least ``retention_days`` days."""
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1, not {retention_days}")
    return day_start(now_unix_ns) - retention_days * DAY_NS


def partition_name(day_start_unix_ns: int) -> str:
    """The name of the partition holding the UTC day that starts at ``day_start_unix_ns``."""
    day = dt.datetime.fromtimestamp(day_start_unix_ns // 1_000_000_000, tz=dt.UTC)
    return f"{WINDOW_PARTITION_PREFIX}{day:%Y%m%d}"


def partition_day(name: str) -> int | None:
    """The day start a partition name stands for, or None if it is no day partition."""
    match = _PARTITION_NAME.fullmatch(name)
    if match is None:
        return None
    day = dt.datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=dt.UTC)
    return int(day.timestamp()) * 1_000_000_000


def maintain_windows(
    writer: Engine,
    now_unix_ns: int,
    retention_days: int | None = None,
    days_ahead: int = PARTITION_DAYS_AHEAD,
) -> MaintenanceReport:
    """Apply retention (when ``retention_days`` is set) and, on PostgreSQL, create the
    partitions from today to ``days_ahead`` days ahead, plus one for every day the default
    partition holds rows of (not past retention).

    Each step is its own short transaction: a failure (e.g. a lock not granted in time,
    raised as StoreUnavailableError) keeps what earlier steps did; the next run goes on.
    """
    if days_ahead < 0:
        raise ValueError(f"days_ahead must be >= 0, not {days_ahead}")
    cutoff = None if retention_days is None else retention_cutoff(now_unix_ns, retention_days)
    if writer.dialect.name != "postgresql":
        deleted = 0 if cutoff is None else _delete_in_batches(writer, cutoff)
        return MaintenanceReport(windows_deleted=deleted)
    dropped, deleted = ((), 0) if cutoff is None else _expire_partitions(writer, cutoff)
    today = day_start(now_unix_ns)
    wanted = set(range(today, today + (days_ahead + 1) * DAY_NS, DAY_NS))
    with writer.connect() as conn:
        wanted |= {day for day in _days_in_default(conn) if cutoff is None or day >= cutoff}
    created = create_window_partitions(writer, sorted(wanted))
    return MaintenanceReport(created, dropped, deleted)


def create_window_partitions(writer: Engine, days: Sequence[int]) -> tuple[str, ...]:
    """Create the day partitions (PostgreSQL) of ``days`` (day starts) that do not exist yet.

    Rows the default partition holds for such a day move into the new partition.
    Returns the names created.
    """
    with writer.connect() as conn:
        existing = set(_day_partitions(conn))
    created = []
    for day in days:
        if day_start(day) != day:
            raise ValueError(f"{day} is not the start of a UTC day")
        if day not in existing:
            with writer.begin() as conn:
                _set_lock_timeout(conn)
                created.append(_create_partition(conn, day))
    return tuple(created)


def _create_partition(conn: Connection, day: int) -> str:
    # Built standalone, filled from the default partition, then attached: creating it
    # directly as a partition fails while the default partition holds rows of its range.
    name = partition_name(day)
    bounds = {"low": day, "high": day + DAY_NS}
    conn.exec_driver_sql(f"CREATE TABLE {name} (LIKE gpu_windows INCLUDING DEFAULTS)")
    conn.execute(
        text(
            f"WITH moved AS (DELETE FROM {DEFAULT_WINDOW_PARTITION} "  # noqa: S608
            "WHERE start_unix_ns >= :low AND start_unix_ns < :high RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved"
        ),
        bounds,
    )
    # Attaching creates the partition's key, indexes and foreign key from the parent's.
    conn.exec_driver_sql(
        f"ALTER TABLE gpu_windows ATTACH PARTITION {name} "
        f"FOR VALUES FROM ({day}) TO ({day + DAY_NS})"
    )
    return name


def _expire_partitions(writer: Engine, cutoff: int) -> tuple[tuple[str, ...], int]:
    with writer.connect() as conn:
        partitions = _day_partitions(conn)
    dropped = []
    for day, name in sorted(partitions.items()):
        if day + DAY_NS <= cutoff:
            with writer.begin() as conn:
                _set_lock_timeout(conn)
                _drop_partition(conn, name)
            dropped.append(name)
    with writer.begin() as conn:
        gone = conn.execute(
            text(
                f"WITH gone AS (DELETE FROM {DEFAULT_WINDOW_PARTITION} "  # noqa: S608
                "WHERE start_unix_ns < :cutoff RETURNING agent_id) "
                "SELECT agent_id, count(*) FROM gone GROUP BY agent_id"
            ),
            {"cutoff": cutoff},
        )
        removed = {str(agent_id): int(count) for agent_id, count in gone}
        _subtract_windows_stored(conn, removed)
    return tuple(dropped), sum(removed.values())


def _drop_partition(conn: Connection, name: str) -> None:
    # Inserts into the partition (late windows of an old day) wait from the lock to the
    # commit, so the count is exactly what the drop removes; readers are not held up. The
    # mode conflicts with itself: two maintenance runs take turns instead of deadlocking.
    conn.exec_driver_sql(f"LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE")
    counts = conn.execute(text(f"SELECT agent_id, count(*) FROM {name} GROUP BY agent_id"))  # noqa: S608
    removed = {str(agent_id): int(count) for agent_id, count in counts}
    conn.exec_driver_sql(f"DROP TABLE {name}")
    _subtract_windows_stored(conn, removed)


def _delete_in_batches(writer: Engine, cutoff: int) -> int:
    deleted = 0
    while True:
        with writer.begin() as conn:
            # SQLite >= 3.35 (RETURNING): the agents whose counters drop with this batch.
            agent_ids = conn.execute(
                text(
                    "DELETE FROM gpu_windows WHERE rowid IN (SELECT rowid FROM gpu_windows "
                    "WHERE start_unix_ns < :cutoff LIMIT :batch) RETURNING agent_id"
                ),
                {"cutoff": cutoff, "batch": SQLITE_DELETE_BATCH},
            ).scalars()
            removed = Counter(str(agent_id) for agent_id in agent_ids)
            _subtract_windows_stored(conn, removed)
        batch = sum(removed.values())
        deleted += batch
        if batch < SQLITE_DELETE_BATCH:
            return deleted


def _subtract_windows_stored(conn: Connection, removed: Mapping[str, int]) -> None:
    """Take the windows each agent of ``removed`` lost off its ``windows_stored`` counter.

    Call it in the transaction that deleted them. Agents are updated by id, the order the
    ingest path locks them in.
    """
    rows = [
        {"b_agent": agent_id, "b_removed": count}
        for agent_id, count in sorted(removed.items())
        if count
    ]
    if rows:
        conn.execute(_SUBTRACT_WINDOWS, rows)


_SUBTRACT_WINDOWS = (
    update(Agent)
    .where(Agent.agent_id == bindparam("b_agent"))
    .values(windows_stored=Agent.windows_stored - bindparam("b_removed"))
)


def _day_partitions(conn: Connection) -> dict[int, str]:
    """Day start -> name of every day partition attached to gpu_windows."""
    names = conn.execute(
        text(
            "SELECT child.relname FROM pg_inherits "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE pg_inherits.inhparent = 'gpu_windows'::regclass"
        )
    ).scalars()
    partitions = {}
    for name in names:
        day = partition_day(name)
        if day is not None:
            partitions[day] = name
    return partitions


def _days_in_default(conn: Connection) -> list[int]:
    query = text(
        f"SELECT DISTINCT start_unix_ns - start_unix_ns % {DAY_NS} "  # noqa: S608
        f"FROM {DEFAULT_WINDOW_PARTITION}"
    )
    return [int(day) for day in conn.execute(query).scalars()]


def _set_lock_timeout(conn: Connection) -> None:
    conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
