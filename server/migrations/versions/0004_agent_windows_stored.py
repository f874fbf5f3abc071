"""Per-agent counter of stored GPU windows.

``agents.windows_stored`` holds how many rows of gpu_windows belong to the agent, so the
per-agent summary (``gpuattest verifier agents``, Results ``ListAgents``) reads one row per
agent instead of counting every window (1.1 s at 10 million windows). Ingest adds the
windows it inserts and retention takes off what it removes, each in its own transaction.
The upgrade back-fills the counter from the rows already stored; the downgrade drops it.

Every verifier replica must run code that knows the counter once this is applied: a replica
still on 0003 would store windows without counting them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "agents"
COLUMN = "windows_stored"


def upgrade() -> None:
    """Add agents.windows_stored and set it to each agent's count of gpu_windows rows."""
    # A constant default: SQLite adds the column in place, PostgreSQL without a rewrite.
    op.add_column(TABLE, sa.Column(COLUMN, sa.BigInteger(), server_default="0", nullable=False))
    # One count per agent through the (agent_id, start_unix_ns) index; the migration holds
    # the store's migration lock, and replicas wait for it before they ingest.
    op.execute(
        f"UPDATE {TABLE} SET {COLUMN} = (SELECT count(*) FROM gpu_windows "  # noqa: S608
        f"WHERE gpu_windows.agent_id = {TABLE}.agent_id)"
    )


def downgrade() -> None:
    """Drop agents.windows_stored (SQLite >= 3.35 drops a column in place)."""
    op.drop_column(TABLE, COLUMN)
