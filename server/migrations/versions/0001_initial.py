"""Initial schema: enrolment, keys, the evidence chain, GPU windows, gaps and nonces.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create every table of the evidence store."""
    _create_enrolment_tables()
    _create_evidence_tables()
    _create_gaps_and_nonces()


def downgrade() -> None:
    """Drop every table, children before parents."""
    for index, table in (
        ("ix_nonces_expires_unix_ns", "nonces"),
        ("ix_nonces_agent_id", "nonces"),
        ("ix_gpu_windows_agent_id_start_unix_ns", "gpu_windows"),
        ("ix_gpu_windows_start_unix_ns", "gpu_windows"),
        ("ix_keys_agent_id", "keys"),
    ):
        op.drop_index(op.f(index), table_name=table)
    for table in (
        "nonces",
        "gaps",
        "processes",
        "gpu_windows",
        "envelopes",
        "keys",
        "agents",
        "enrol_tokens",
    ):
        op.drop_table(table)


def _create_enrolment_tables() -> None:
    op.create_table(
        "enrol_tokens",
        sa.Column("token_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("expires_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("created_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("used_at_unix_ns", sa.BigInteger(), nullable=True),
        sa.Column("used_by_agent", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("token_sha256", name=op.f("pk_enrol_tokens")),
    )
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("enrolled_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("acked_sequence", sa.BigInteger(), nullable=False),
        sa.Column("last_envelope_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("last_seen_unix_ns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
    )
    op.create_table(
        "keys",
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_unix_ns", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.agent_id"], name=op.f("fk_keys_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_keys")),
    )
    op.create_index(op.f("ix_keys_agent_id"), "keys", ["agent_id"])


def _create_evidence_tables() -> None:
    op.create_table(
        "envelopes",
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.LargeBinary(), nullable=False),
        sa.Column("payload_type", sa.String(), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("received_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("window_start_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("window_end_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.agent_id"], name=op.f("fk_envelopes_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("agent_id", "sequence", name=op.f("pk_envelopes")),
    )
    op.create_table(
        "gpu_windows",
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
            name=op.f("fk_gpu_windows_agent_id_sequence_envelopes"),
        ),
        sa.PrimaryKeyConstraint("agent_id", "sequence", "gpu_index", name=op.f("pk_gpu_windows")),
    )
    op.create_index(op.f("ix_gpu_windows_start_unix_ns"), "gpu_windows", ["start_unix_ns"])
    op.create_index(
        op.f("ix_gpu_windows_agent_id_start_unix_ns"), "gpu_windows", ["agent_id", "start_unix_ns"]
    )
    op.create_table(
        "processes",
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("process_index", sa.BigInteger(), nullable=False),
        sa.Column("gpu_index", sa.BigInteger(), nullable=False),
        sa.Column("pid", sa.BigInteger(), nullable=False),
        sa.Column("used_memory_mib", sa.BigInteger(), nullable=False),
        sa.Column("job_kind", sa.String(), nullable=False),
        sa.Column("job_id", sa.String(), nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id", "sequence"],
            ["envelopes.agent_id", "envelopes.sequence"],
            name=op.f("fk_processes_agent_id_sequence_envelopes"),
        ),
        sa.PrimaryKeyConstraint("agent_id", "sequence", "process_index", name=op.f("pk_processes")),
    )


def _create_gaps_and_nonces() -> None:
    op.create_table(
        "gaps",
        # SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("first_missing", sa.BigInteger(), nullable=False),
        sa.Column("last_missing", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("detected_unix_ns", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('declared', 'observed')", name=op.f("ck_gaps_kind")),
        sa.CheckConstraint("first_missing <= last_missing", name=op.f("ck_gaps_range")),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.agent_id"], name=op.f("fk_gaps_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gaps")),
        sa.UniqueConstraint(
            "agent_id",
            "first_missing",
            "last_missing",
            "kind",
            name=op.f("uq_gaps_agent_id_first_missing_last_missing_kind"),
        ),
    )
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("expires_unix_ns", sa.BigInteger(), nullable=False),
        sa.Column("used_at_unix_ns", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.agent_id"], name=op.f("fk_nonces_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_nonces")),
    )
    op.create_index(op.f("ix_nonces_agent_id"), "nonces", ["agent_id"])
    op.create_index(op.f("ix_nonces_expires_unix_ns"), "nonces", ["expires_unix_ns"])
