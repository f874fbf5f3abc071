"""GPU-window features packed as float64 values under a layout of their names.

New rows of gpu_windows carry ``layout_id`` (a row of the new ``feature_layouts``: the
names, in order) and ``feature_values`` (the values, little-endian float64, in that order)
instead of ``features_json``, which becomes nullable: rows stored before keep their JSON and
are read as they are (see server.store.features). Downgrading writes JSON back for the
packed rows, then drops the new columns and table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "gpu_windows"
LAYOUTS = "feature_layouts"
KEY = ("agent_id", "sequence", "gpu_index", "start_unix_ns")


def upgrade() -> None:
    """Add feature_layouts and the packed columns; let features_json be NULL."""
    op.create_table(
        LAYOUTS,
        sa.Column("layout_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("names_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("layout_id", name="pk_feature_layouts"),
    )
    # On PostgreSQL these are plain ALTERs, applied to every partition; SQLite cannot
    # relax NOT NULL in place, so batch mode copies the table.
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("layout_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("feature_values", sa.LargeBinary(), nullable=True))
        batch.alter_column("features_json", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    """Write packed features back as JSON, then drop the packed columns and the layouts."""
    _packed_rows_to_json()
    with op.batch_alter_table(TABLE) as batch:
        batch.alter_column("features_json", existing_type=sa.Text(), nullable=False)
        batch.drop_column("feature_values")
        batch.drop_column("layout_id")
    op.drop_table(LAYOUTS)


def _packed_rows_to_json() -> None:
    # JSON as the verifier wrote it before 0003: keys sorted.
    bind = op.get_bind()
    names = {
        layout_id: json.loads(names_json)
        for layout_id, names_json in bind.execute(
            sa.text(f"SELECT layout_id, names_json FROM {LAYOUTS}")  # noqa: S608
        )
    }
    key = ", ".join(KEY)
    rows = bind.execute(
        sa.text(
            f"SELECT {key}, layout_id, feature_values FROM {TABLE} "  # noqa: S608
            "WHERE features_json IS NULL"
        )
    ).all()
    updates = []
    for *key_values, layout_id, packed in rows:
        layout = names[layout_id]
        values = struct.unpack(f"<{len(layout)}d", packed)
        features = json.dumps(dict(zip(layout, values, strict=True)), sort_keys=True)
        updates.append({"features": features, **dict(zip(KEY, key_values, strict=True))})
    if updates:
        where = " AND ".join(f"{column} = :{column}" for column in KEY)
        bind.execute(
            sa.text(f"UPDATE {TABLE} SET features_json = :features WHERE {where}"),  # noqa: S608
            updates,
        )
