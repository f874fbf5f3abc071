"""Partition gpu_windows by window start on PostgreSQL; its key gains start_unix_ns.

PostgreSQL: gpu_windows becomes a table partitioned by RANGE (start_unix_ns) with one
default partition, and the rows move into it. Day partitions are created (and old ones
dropped) by the maintenance call in server.store.retention, not here: a migration has no
clock. SQLite has no partitioning; there the table is rebuilt with the same four-column key,
so both databases hold the same schema.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "gpu_windows"
DEFAULT_PARTITION = "gpu_windows_default"
# The table's previous self while its rows are copied over.
OLD_TABLE = "gpu_windows_before_0002"
KEY_BEFORE = ("agent_id", "sequence", "gpu_index")
KEY_AFTER = (*KEY_BEFORE, "start_unix_ns")
COLUMNS = (
    "agent_id",
    "sequence",
    "gpu_index",
    "gpu_uuid",
    "start_unix_ns",
    "end_unix_ns",
    "sample_count",
    "verdict",
    "confidence",
    "model_version",
    "features_json",
)
INDEXES = {
    "ix_gpu_windows_start_unix_ns": ("start_unix_ns",),
    "ix_gpu_windows_agent_id_start_unix_ns": ("agent_id", "start_unix_ns"),
}


def upgrade() -> None:
    """Give gpu_windows the four-column key; on PostgreSQL, partition it by start time."""
    if op.get_bind().dialect.name == "postgresql":
        _rebuild_on_postgresql(KEY_AFTER, partitioned=True)
    else:
        _rekey_in_place(KEY_AFTER)


def downgrade() -> None:
    """Back to one plain table keyed by (agent, sequence, GPU), partitions and all merged."""
    if op.get_bind().dialect.name == "postgresql":
        _rebuild_on_postgresql(KEY_BEFORE, partitioned=False)
    else:
        _rekey_in_place(KEY_BEFORE)


def _rekey_in_place(key: Sequence[str]) -> None:
    # SQLite cannot alter a primary key; batch mode copies the table into a new one.
    with op.batch_alter_table(TABLE, recreate="always") as batch:
        batch.drop_constraint("pk_gpu_windows", type_="primary")
        batch.create_primary_key("pk_gpu_windows", list(key))


def _rebuild_on_postgresql(key: Sequence[str], *, partitioned: bool) -> None:
    # A table cannot be turned into a partitioned one (or back) in place: build the new
    # table beside the old, copy the rows across, drop the old. The old one gives up its
    # key and index names first, since index names are unique per schema.
    op.rename_table(TABLE, OLD_TABLE)
    op.drop_constraint("pk_gpu_windows", OLD_TABLE, type_="primary")
    for index in INDEXES:
        op.drop_index(index, table_name=OLD_TABLE)
    _create_table(key, partitioned=partitioned)
    if partitioned:
        op.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")
    columns = ", ".join(COLUMNS)
    op.execute(f"INSERT INTO {TABLE} ({columns}) SELECT {columns} FROM {OLD_TABLE}")  # noqa: S608
    # Dropping a partitioned table drops its partitions with it.
    op.drop_table(OLD_TABLE)
    for index, indexed in INDEXES.items():
        op.create_index(index, TABLE, list(indexed))


def _create_table(key: Sequence[str], *, partitioned: bool) -> None:
    options: dict[str, Any] = (
        {"postgresql_partition_by": "RANGE (start_unix_ns)"} if partitioned else {}
    )
    op.create_table(
        TABLE,
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("gpu_index", sa.BigInteger(), nullable=False),
        sa.Column("gpu_uuid", sa.String(), nullable=False),
        sa.Column("start_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("end_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("sample_count", sa.BigInteger(), nullable=False),
        sa.Column("verdict", sa.String(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("features_json", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id", "sequence"],
            ["envelopes.agent_id", "envelopes.sequence"],
            name="fk_gpu_windows_agent_id_sequence_envelopes",
        ),
        sa.PrimaryKeyConstraint(*key, name="pk_gpu_windows"),
        **options,
    )
