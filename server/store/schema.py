"""Tables of the verifier's evidence store, as SQLAlchemy ORM models.

The models define the schema the migrations in ``server/migrations`` must build; a test
compares the two. They never leave :mod:`server.store`: callers see the plain records of
:mod:`server.records`. Times are integer nanoseconds since the Unix epoch, in columns
named ``*_unix_ns``. Everything here is portable SQL (SQLite and PostgreSQL), except that
PostgreSQL partitions ``gpu_windows`` by window start (see :mod:`server.store.retention`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints keep migrations reproducible: PostgreSQL otherwise picks its own names
# and SQLite's batch ALTER needs a name to find a constraint again.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

GAP_KINDS = ("declared", "observed")
# PostgreSQL only: gpu_windows is range-partitioned by start_unix_ns into one table per UTC
# day, named WINDOW_PARTITION_PREFIX + YYYYMMDD, plus a default partition that catches
# windows no day partition covers yet. Partitions are not models: the maintenance call in
# server.store.retention creates and drops them, and migrations must leave them alone.
WINDOW_PARTITION_PREFIX = "gpu_windows_p"
DEFAULT_WINDOW_PARTITION = "gpu_windows_default"


def is_window_partition(table_name: str) -> bool:
    """True for a partition of gpu_windows (a day's table or the default one)."""
    return table_name == DEFAULT_WINDOW_PARTITION or table_name.startswith(WINDOW_PARTITION_PREFIX)


def include_in_autogenerate(name: str | None, type_: str, _parent_names: object) -> bool:
    """Alembic ``include_name`` hook: compare every table except gpu_windows' partitions."""
    return not (type_ == "table" and name is not None and is_window_partition(name))


class Base(DeclarativeBase):
    """Declarative base: 64-bit integers, binary bytes and unbounded strings by default.

    Strings carry no length because PostgreSQL enforces lengths and SQLite does not; the
    wire limits (:mod:`proto.limits`) already bound every string before it gets here.
    """

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy's declared class attribute
        int: BigInteger(),
        bytes: LargeBinary(),
        str: String(),
        float: Double(),
    }


class EnrolToken(Base):
    """A one-time enrolment token, stored by its SHA-256 only."""

    __tablename__ = "enrol_tokens"

    token_sha256: Mapped[bytes] = mapped_column(primary_key=True)
    hostname: Mapped[str]  # "": any host may use it
    expires_unix_ns: Mapped[int]
    created_unix_ns: Mapped[int]
    used_at_unix_ns: Mapped[int | None]
    used_by_agent: Mapped[str | None]


class Agent(Base):
    """An enrolled agent (one per host) and where its evidence chain stands."""

    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(primary_key=True)
    hostname: Mapped[str]
    enrolled_unix_ns: Mapped[int]
    acked_sequence: Mapped[int]
    last_envelope_sha256: Mapped[bytes]
    last_seen_unix_ns: Mapped[int]  # 0: never
    # GPU windows of this agent in gpu_windows, kept by whatever inserts or deletes them in
    # the same transaction, so the per-agent summary need not count millions of rows.
    windows_stored: Mapped[int] = mapped_column(server_default="0")


class Key(Base):
    """An agent's Ed25519 public key; an agent may hold several while rotating."""

    __tablename__ = "keys"

    key_id: Mapped[str] = mapped_column(primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.agent_id"), index=True)
    public_key: Mapped[bytes]
    created_unix_ns: Mapped[int]
    revoked_at_unix_ns: Mapped[int | None]


class Envelope(Base):
    """An accepted envelope, byte-exact as received."""

    __tablename__ = "envelopes"

    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.agent_id"), primary_key=True)
    sequence: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[bytes]
    payload_type: Mapped[str]
    envelope: Mapped[bytes]
    received_unix_ns: Mapped[int]
    window_start_unix_ns: Mapped[int]  # 0 for a gap notice
    window_end_unix_ns: Mapped[int]
    source: Mapped[str]
    nonce: Mapped[bytes]  # b"": not a challenge answer


class GpuWindow(Base):
    """One GPU over one window, with the verifier's verdict on it.

    The key includes the start time because PostgreSQL only enforces keys that contain the
    partition key. (agent, sequence, GPU) stays unique all the same: windows are only
    inserted with their envelope, whose key is (agent, sequence), and appraisal refuses an
    envelope listing one GPU twice.
    """

    __tablename__ = "gpu_windows"
    __table_args__ = (
        ForeignKeyConstraint(
            ["agent_id", "sequence"], ["envelopes.agent_id", "envelopes.sequence"]
        ),
        # Time-range queries across the fleet, and per agent.
        Index("ix_gpu_windows_start_unix_ns", "start_unix_ns"),
        Index("ix_gpu_windows_agent_id_start_unix_ns", "agent_id", "start_unix_ns"),
        {"postgresql_partition_by": "RANGE (start_unix_ns)"},
    )

    agent_id: Mapped[str] = mapped_column(primary_key=True)
    sequence: Mapped[int] = mapped_column(primary_key=True)
    gpu_index: Mapped[int] = mapped_column(primary_key=True)
    gpu_uuid: Mapped[str]
    start_unix_ns: Mapped[int] = mapped_column(primary_key=True)
    end_unix_ns: Mapped[int]
    sample_count: Mapped[int]
    verdict: Mapped[str]
    confidence: Mapped[float]
    model_version: Mapped[str]
    # Rows stored before migration 0003: the features as a JSON object. Since then: NULL,
    # and the values packed (server.store.features) under the layout of their names.
    features_json: Mapped[str | None] = mapped_column(Text())
    layout_id: Mapped[int | None]
    feature_values: Mapped[bytes | None]


class FeatureLayout(Base):
    """A list of feature names, in order, as GPU windows' packed values follow it.

    The id is derived from the names (:mod:`server.store.features`), so replicas agree on
    it without coordination; rows are only ever added.
    """

    __tablename__ = "feature_layouts"

    layout_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    names_json: Mapped[str] = mapped_column(Text())


class Process(Base):
    """A GPU process named in an envelope and the job the agent attributed it to.

    Keyed by its position in the envelope's list, so whatever the agent reported (even the
    same pid twice) is stored as it was signed.
    """

    __tablename__ = "processes"
    __table_args__ = (
        ForeignKeyConstraint(
            ["agent_id", "sequence"], ["envelopes.agent_id", "envelopes.sequence"]
        ),
    )

    agent_id: Mapped[str] = mapped_column(primary_key=True)
    sequence: Mapped[int] = mapped_column(primary_key=True)
    process_index: Mapped[int] = mapped_column(primary_key=True)
    gpu_index: Mapped[int]
    pid: Mapped[int]
    used_memory_mib: Mapped[int]
    job_kind: Mapped[str]
    job_id: Mapped[str]
    trusted: Mapped[bool]


class Gap(Base):
    """A range of sequences missing from an agent's chain."""

    __tablename__ = "gaps"
    __table_args__ = (
        UniqueConstraint("agent_id", "first_missing", "last_missing", "kind"),
        CheckConstraint("kind IN ('declared', 'observed')", name="kind"),
        CheckConstraint("first_missing <= last_missing", name="range"),
    )

    # SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.agent_id"))
    first_missing: Mapped[int]
    last_missing: Mapped[int]
    kind: Mapped[str]
    detected_unix_ns: Mapped[int]


class Nonce(Base):
    """A challenge nonce issued to one agent."""

    __tablename__ = "nonces"

    nonce: Mapped[bytes] = mapped_column(primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.agent_id"), index=True)
    expires_unix_ns: Mapped[int] = mapped_column(index=True)
    used_at_unix_ns: Mapped[int | None]
