"""The verifier's evidence store: enrolments, keys, the per-agent evidence chain and results.

Every public method is one transaction. Writes commit before they return, so evidence the
verifier acknowledged survives a crash. Inputs and outputs are the plain records of
:mod:`server.records`; ORM objects never leave this package.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from server.records import (
    AcceptedEnvelope,
    AgentState,
    AgentSummary,
    GapRecord,
    KeyRecord,
    NonceRecord,
    WindowRow,
)
from server.store.engine import PoolOptions, create_store_engine, upgrade_to_head, writer_engine
from server.store.enrolment import consume_token, ensure_agent
from server.store.errors import EnrolmentRefused, StoreError, StoreUnavailableError
from server.store.evidence import (
    check_gap,
    declared_gap,
    insert_new_gaps,
    require_agents,
    store_fresh,
    touch,
)
from server.store.queries import (
    WINDOW_COLUMNS,
    current_keys,
    open_or_lost_gaps_by_agent,
    window_row,
)
from server.store.retention import PARTITION_DAYS_AHEAD, MaintenanceReport, maintain_windows
from server.store.schema import (
    Agent,
    EnrolToken,
    Envelope,
    FeatureLayout,
    GpuWindow,
    Key,
    Nonce,
)

_T = TypeVar("_T")
# Two verifier replicas storing the same (agent, sequence) at once: the later transaction
# hits a unique key; running it again finds the rows the other committed and skips them.
_CONFLICT_ATTEMPTS = 3


class Store:
    """Durable home of enrolments, keys, accepted evidence and its appraisal results."""

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine whose database is already at the head migration (see :meth:`open`)."""
        self._engine = engine
        self._writer = writer_engine(engine)

    @classmethod
    def open(cls, url: str, pool: PoolOptions | None = None) -> Store:
        """Connect to ``url`` and migrate its schema to head.

        ``url`` is ``sqlite:///path`` or ``postgresql://user@host:port/db`` (psycopg 3; also
        spelt ``postgresql+psycopg://``). Raises StoreUnavailableError when the database
        cannot be reached.
        """
        engine = create_store_engine(url, pool)
        try:
            upgrade_to_head(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def ping(self) -> bool:
        """True if the database answers a trivial query now (for health checks); never raises."""
        try:
            with self._engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except (StoreUnavailableError, SQLAlchemyError):
            return False
        return True

    def maintain_windows(
        self,
        now_unix_ns: int,
        retention_days: int | None = None,
        days_ahead: int = PARTITION_DAYS_AHEAD,
    ) -> MaintenanceReport:
        """Drop GPU windows past ``retention_days`` (None keeps all) and, on PostgreSQL,
        create the day partitions up to ``days_ahead`` days ahead of ``now_unix_ns``.

        Meant to run at start-up and then every hour or so; see :mod:`server.store.retention`.
        """
        return maintain_windows(self._writer, now_unix_ns, retention_days, days_ahead)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- enrolment -------------------------------------------------------------------------

    def add_enrol_token(
        self, token_sha256: bytes, hostname: str, expires_unix_ns: int, now_unix_ns: int
    ) -> None:
        """Store a one-time enrolment token by its hash; ``hostname`` "" lets any host use it."""
        row = {
            "token_sha256": token_sha256,
            "hostname": hostname,
            "expires_unix_ns": expires_unix_ns,
            "created_unix_ns": now_unix_ns,
        }
        try:
            with self._writer.begin() as conn:
                conn.execute(insert(EnrolToken), [row])
        except IntegrityError as error:
            raise StoreError("an enrolment token with this hash already exists") from error

    def enroll(
        self,
        token_sha256: bytes,
        hostname: str,
        agent_id: str,
        public_key: bytes,
        key_id: str,
        now_unix_ns: int,
    ) -> None:
        """Consume a valid token and enrol ``agent_id`` with its key, in one transaction.

        Raises :class:`EnrolmentRefused` (and changes nothing) when the token is unknown,
        used, expired or bound to another host, when ``agent_id`` is already enrolled on
        another host, or when ``key_id`` is taken. An agent already enrolled on this host
        gains the key alongside its current ones (key rotation); its chain is untouched.
        """
        key_row = {
            "key_id": key_id,
            "agent_id": agent_id,
            "public_key": public_key,
            "created_unix_ns": now_unix_ns,
        }
        try:
            with self._writer.begin() as conn:
                consume_token(conn, token_sha256, hostname, agent_id, now_unix_ns)
                ensure_agent(conn, agent_id, hostname, now_unix_ns)
                if conn.execute(select(Key.key_id).where(Key.key_id == key_id)).first():
                    raise EnrolmentRefused("key_already_enrolled")
                conn.execute(insert(Key), [key_row])
        except IntegrityError as error:
            # Only reachable where writers are not serialised (PostgreSQL): another
            # transaction enrolled this agent or key between our checks and our inserts.
            raise EnrolmentRefused("key_already_enrolled") from error

    def revoke_key(self, key_id: str, now_unix_ns: int) -> bool:
        """Revoke a key (keeping the first revocation time); False if the key is unknown."""
        with self._writer.begin() as conn:
            conn.execute(
                update(Key)
                .where(Key.key_id == key_id, Key.revoked_at_unix_ns.is_(None))
                .values(revoked_at_unix_ns=now_unix_ns)
            )
            return conn.execute(select(Key.key_id).where(Key.key_id == key_id)).first() is not None

    def key(self, key_id: str) -> KeyRecord | None:
        """The enrolled key ``key_id``, or None."""
        query = select(Key.agent_id, Key.public_key, Key.revoked_at_unix_ns).where(
            Key.key_id == key_id
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return KeyRecord(key_id, row.agent_id, row.public_key, row.revoked_at_unix_ns is not None)

    def keys_with_chain_states(
        self, key_ids: Collection[str]
    ) -> dict[str, tuple[KeyRecord, AgentState]]:
        """Each enrolled key of ``key_ids`` with its agent's chain state, in one query.

        Unknown key ids are left out. The ingest path reads everything a group of Submit
        calls needs to know up front with this, instead of two queries per call.
        """
        if not key_ids:
            return {}
        query = (
            select(
                Key.key_id,
                Key.agent_id,
                Key.public_key,
                Key.revoked_at_unix_ns,
                Agent.acked_sequence,
                Agent.last_envelope_sha256,
            )
            .join(Agent, Agent.agent_id == Key.agent_id)
            .where(Key.key_id.in_(set(key_ids)))
        )
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return {
            row.key_id: (
                KeyRecord(
                    row.key_id, row.agent_id, row.public_key, row.revoked_at_unix_ns is not None
                ),
                AgentState(row.agent_id, row.acked_sequence, row.last_envelope_sha256),
            )
            for row in rows
        }

    # -- evidence chain --------------------------------------------------------------------

    def agent_state(self, agent_id: str) -> AgentState | None:
        """Where the agent's chain stands; None for an agent never enrolled."""
        query = select(Agent.acked_sequence, Agent.last_envelope_sha256).where(
            Agent.agent_id == agent_id
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return AgentState(agent_id, row.acked_sequence, row.last_envelope_sha256)

    def stored_envelope_sha256(self, agent_id: str, sequence: int) -> bytes | None:
        """SHA-256 of the stored envelope (agent, sequence), or None if none is stored."""
        query = select(Envelope.sha256).where(
            Envelope.agent_id == agent_id, Envelope.sequence == sequence
        )
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    def store_accepted(self, accepted: Sequence[AcceptedEnvelope]) -> int:
        """Store appraised envelopes in one committed transaction; return how many were new.

        For each envelope not stored yet: its exact bytes, GPU windows and processes, a
        "declared" gap for a gap notice, its nonce marked used, and the agent's chain state
        advanced to it (never backwards) and last seen moved to its receipt time. An
        (agent, sequence) already stored, or repeated within ``accepted``, is skipped.
        Raises :class:`StoreError` (storing nothing) if an agent was never enrolled or the
        rows clash (e.g. one GPU index twice in an envelope), ValueError for a malformed
        declared gap.
        """
        declared = [gap for gap in map(declared_gap, accepted) if gap is not None]
        for gap in declared:
            check_gap(gap)
        if not accepted:
            return 0
        return self._write_tolerating_races(lambda conn: store_fresh(conn, accepted))

    def record_gap(self, gap: GapRecord) -> None:
        """Record a gap, once per (agent, first_missing, last_missing, kind)."""
        check_gap(gap)

        def work(conn: Connection) -> None:
            require_agents(conn, [gap.agent_id])
            insert_new_gaps(conn, [gap])

        self._write_tolerating_races(work)

    def touch_agent(self, agent_id: str, now_unix_ns: int) -> None:
        """Note that the agent was heard from (last seen never moves backwards)."""
        with self._writer.begin() as conn:
            touch(conn, agent_id, now_unix_ns)

    # -- nonces ----------------------------------------------------------------------------

    def add_nonce(self, nonce: NonceRecord) -> None:
        """Store a freshly issued challenge nonce (``nonce.used`` must be False)."""
        if nonce.used:
            raise ValueError("a nonce is stored when issued, before it can be used")
        row = {
            "nonce": nonce.nonce,
            "agent_id": nonce.agent_id,
            "expires_unix_ns": nonce.expires_unix_ns,
        }
        try:
            with self._writer.begin() as conn:
                require_agents(conn, [nonce.agent_id])
                conn.execute(insert(Nonce), [row])
        except IntegrityError as error:
            raise StoreError("this nonce was already issued") from error

    def nonce(self, nonce: bytes) -> NonceRecord | None:
        """The issued nonce, or None if it was never issued (or purged)."""
        query = select(Nonce.agent_id, Nonce.expires_unix_ns, Nonce.used_at_unix_ns).where(
            Nonce.nonce == nonce
        )
        with self._engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return NonceRecord(
            nonce, row.agent_id, row.expires_unix_ns, row.used_at_unix_ns is not None
        )

    def purge_expired_nonces(self, now_unix_ns: int) -> int:
        """Delete nonces that expired at or before ``now_unix_ns``; return how many."""
        with self._writer.begin() as conn:
            result = conn.execute(delete(Nonce).where(Nonce.expires_unix_ns <= now_unix_ns))
            return result.rowcount

    # -- queries for the CLI and the Results service ---------------------------------------

    def list_agents(self) -> list[AgentSummary]:
        """Every enrolled agent, by agent id, with its current key and stored counts.

        The key shown is the newest unrevoked one (``revoked`` False), or when every key is
        revoked the newest one (``revoked`` True). Windows stored come from each agent's
        counter, kept by ingest and retention, so this reads no window rows.
        """
        agents_query = select(
            Agent.agent_id,
            Agent.hostname,
            Agent.acked_sequence,
            Agent.last_seen_unix_ns,
            Agent.windows_stored,
        ).order_by(Agent.agent_id)
        with self._engine.connect() as conn:
            agents = conn.execute(agents_query).all()
            keys = current_keys(conn)
            gaps = open_or_lost_gaps_by_agent(conn)
        return [
            AgentSummary(
                agent_id=agent.agent_id,
                hostname=agent.hostname,
                key_id=keys.get(agent.agent_id, ("", True))[0],
                revoked=keys.get(agent.agent_id, ("", True))[1],
                acked_sequence=agent.acked_sequence,
                windows_stored=agent.windows_stored,
                gaps=gaps.get(agent.agent_id, 0),
                last_seen_unix_ns=agent.last_seen_unix_ns,
            )
            for agent in agents
        ]

    def list_windows(
        self,
        agent_id: str | None = None,
        since_unix_ns: int = 0,
        limit: int = 1000,
        until_unix_ns: int | None = None,
    ) -> list[WindowRow]:
        """Stored GPU windows starting at or after ``since_unix_ns`` (and before
        ``until_unix_ns`` when given), by agent, sequence, GPU."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        query = (
            select(*WINDOW_COLUMNS, Envelope.source)
            .select_from(GpuWindow)
            .join(
                Envelope,
                (Envelope.agent_id == GpuWindow.agent_id)
                & (Envelope.sequence == GpuWindow.sequence),
            )
            .outerjoin(FeatureLayout, FeatureLayout.layout_id == GpuWindow.layout_id)
            .where(GpuWindow.start_unix_ns >= since_unix_ns)
            .order_by(GpuWindow.agent_id, GpuWindow.sequence, GpuWindow.gpu_index)
            .limit(limit)
        )
        if agent_id is not None:
            query = query.where(GpuWindow.agent_id == agent_id)
        if until_unix_ns is not None:
            query = query.where(GpuWindow.start_unix_ns < until_unix_ns)
        with self._engine.connect() as conn:
            return [window_row(row) for row in conn.execute(query)]

    def envelope_bytes(self, agent_id: str, sequence: int) -> bytes | None:
        """The stored envelope, byte-exact as received, or None."""
        query = select(Envelope.envelope).where(
            Envelope.agent_id == agent_id, Envelope.sequence == sequence
        )
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    def count_envelopes(self) -> int:
        """How many envelopes are stored, across all agents."""
        with self._engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Envelope)).scalar_one()

    # -- plumbing --------------------------------------------------------------------------

    def _write_tolerating_races(self, work: Callable[[Connection], _T]) -> _T:
        retrying = Retrying(
            retry=retry_if_exception_type(IntegrityError),
            stop=stop_after_attempt(_CONFLICT_ATTEMPTS),
            reraise=True,
        )
        try:
            return retrying(lambda: self._in_write_transaction(work))
        except IntegrityError as error:
            # Not a race after all: the rows themselves clash (e.g. one GPU listed twice).
            raise StoreError(
                f"rows conflict with the schema or stored rows: {error.orig}"
            ) from error

    def _in_write_transaction(self, work: Callable[[Connection], _T]) -> _T:
        with self._writer.begin() as conn:
            return work(conn)
