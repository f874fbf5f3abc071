"""The agent's durable spool: signed envelopes survive verifier outages and agent crashes.

One SQLite file in WAL mode holds, per agent:

* the chain state (next sequence number, chain head, the verifier's acknowledged sequence,
  how many envelopes were ever dropped), advanced in the same transaction as each append;
* the envelopes themselves, with their hash and the zlib-compressed raw samples that stay
  available for an audit pull;
* the gaps: ranges of sequences the spool had to drop, undelivered, to stay under its size
  cap, each waiting for (or carrying) the signed GapNotice that takes its place.

The spool never signs. After each append the agent asks :meth:`Spool.gaps_needing_notice`,
signs a GapNotice for each range and hands it back with :meth:`Spool.attach_gap_notice`;
until then :meth:`Spool.pending` stops before the gap, so the sender never runs past a loss
the verifier has not been told about.

Threading: a Spool owns one SQLite connection. It may be created in one thread and used in
another, but it is not safe to call from two threads at once: callers serialise access.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from proto.envelope import GENESIS_HASH, envelope_sha256
from proto.errors import GpuattestError

LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE chain_state (
        singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
        next_sequence INTEGER NOT NULL,
        chain_head BLOB NOT NULL,
        acked_sequence INTEGER NOT NULL,
        dropped_total INTEGER NOT NULL
    )""",
    # previous_sha256 is the chain head when the entry was appended: it lets a gap name the
    # envelope before a dropped range even after that envelope was itself pruned.
    """CREATE TABLE entries (
        sequence INTEGER PRIMARY KEY,
        envelope BLOB NOT NULL,
        envelope_sha256 BLOB NOT NULL,
        previous_sha256 BLOB NOT NULL,
        raw_samples_zlib BLOB NOT NULL,
        stored_bytes INTEGER NOT NULL
    )""",
    # notice is NULL until the agent attaches the signed GapNotice for the range.
    """CREATE TABLE gaps (
        first_sequence INTEGER PRIMARY KEY,
        last_sequence INTEGER NOT NULL UNIQUE,
        previous_sha256 BLOB NOT NULL,
        last_sha256 BLOB NOT NULL,
        notice BLOB
    )""",
)


class SpoolError(GpuattestError):
    """The spool refused an operation or cannot be used."""


class SequenceError(SpoolError):
    """An append that is not exactly the next sequence, or an ack of a sequence never spooled."""


class SchemaVersionError(SpoolError):
    """The spool file was written by a newer (or unknown) version of the agent."""


class CapacityError(SpoolError):
    """One entry alone is larger than the spool's size cap: the cap is misconfigured."""


class GapNoticeError(SpoolError):
    """A gap notice cannot be attached: no such gap, already noticed, or the range changed."""


class ItemKind(StrEnum):
    """What a pending item carries."""

    ENVELOPE = "envelope"
    GAP_NOTICE = "gap_notice"


@dataclass(frozen=True)
class SpoolItem:
    """One item to send, in order. A gap notice sits at the last sequence of its range."""

    sequence: int
    kind: ItemKind
    envelope_bytes: bytes


@dataclass(frozen=True)
class DroppedRange:
    """Sequences ``first..last`` (inclusive) dropped undelivered, with the hashes around them.

    ``previous_sha256`` is the hash of envelope ``first - 1`` (GENESIS_HASH when first is 1);
    ``last_sha256`` is the hash of envelope ``last``, the one the next envelope chains to.
    """

    first: int
    last: int
    previous_sha256: bytes
    last_sha256: bytes


@dataclass(frozen=True)
class SpoolStats:
    """Counters for metrics. ``stored_bytes`` counts envelopes plus compressed raw samples."""

    entries: int
    stored_bytes: int
    dropped_total: int
    acked_sequence: int
    next_sequence: int
    gaps_awaiting_notice: int


@dataclass(frozen=True)
class _ChainState:
    next_sequence: int
    chain_head: bytes
    acked_sequence: int


class Spool:
    """Durable, ordered store of signed envelopes with a size cap; see the module docstring.

    ``max_bytes`` caps envelopes plus compressed raw samples. Gap notices are not counted:
    they are small, one per drop event, and must be kept until the verifier acknowledges them.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        """Open (creating if needed) the spool at ``path``; its directory must exist."""
        if max_bytes <= 0:
            raise SpoolError(f"spool cap must be positive, got {max_bytes} bytes")
        self._max_bytes = max_bytes
        _create_private_file(path)
        # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves, so each public
        # call is exactly one transaction and Python's implicit transactions never interfere.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._check_schema_version()
            self._configure_durability()
            self._create_schema_if_new()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the connection; every committed call is already durable before this."""
        self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def next_sequence(self) -> int:
        """Sequence number the next appended envelope must carry (1 for a new spool)."""
        return self._read_state(self._db).next_sequence

    def chain_head(self) -> bytes:
        """SHA-256 of the last appended envelope; GENESIS_HASH before the first append."""
        return self._read_state(self._db).chain_head

    def acked_sequence(self) -> int:
        """Highest sequence the verifier has acknowledged (0 before any ack)."""
        return self._read_state(self._db).acked_sequence

    def append(self, sequence: int, envelope_bytes: bytes, raw_samples: bytes) -> None:
        """Store a signed envelope and its raw samples and advance the chain, atomically.

        Raises SequenceError unless ``sequence`` equals :meth:`next_sequence`, and
        CapacityError when the entry alone exceeds the cap. When the spool goes over its cap,
        acknowledged entries are pruned oldest first, then the oldest unacknowledged ones are
        dropped and recorded as a gap (logged at ERROR).
        """
        compressed = zlib.compress(raw_samples)
        stored_bytes = len(envelope_bytes) + len(compressed)
        if stored_bytes > self._max_bytes:
            raise CapacityError(
                f"entry of {stored_bytes} bytes does not fit a spool capped at "
                f"{self._max_bytes} bytes"
            )
        digest = envelope_sha256(envelope_bytes)
        with self._transaction() as db:
            state = self._read_state(db)
            if sequence != state.next_sequence:
                raise SequenceError(
                    f"append of sequence {sequence} refused: the next sequence is "
                    f"{state.next_sequence}"
                )
            db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                (sequence, envelope_bytes, digest, state.chain_head, compressed, stored_bytes),
            )
            db.execute(
                "UPDATE chain_state SET next_sequence = ?, chain_head = ?",
                (sequence + 1, digest),
            )
            dropped = self._enforce_cap(db, state.acked_sequence)
        # Logged only after the commit, so the log never reports a drop that rolled back.
        if dropped:
            self._log_drop_event(dropped)

    def pending(self, after_sequence: int, limit: int) -> list[SpoolItem]:
        """Items with sequence > ``after_sequence`` in order, at most ``limit`` of them.

        Acknowledged entries still retained are included: the verifier's ack may be lower
        than ours after a restore, and it ingests idempotently. A gap appears as its notice
        at the gap's last sequence; the list stops before a gap that has no notice yet.
        """
        if limit < 1:
            raise SpoolError(f"pending limit must be at least 1, got {limit}")
        rows = self._db.execute(
            "SELECT sequence, envelope, :envelope FROM entries WHERE sequence > :after "
            "UNION ALL "
            "SELECT last_sequence, notice, :notice FROM gaps WHERE last_sequence > :after "
            "ORDER BY 1 LIMIT :limit",
            {
                "after": after_sequence,
                "limit": limit,
                "envelope": ItemKind.ENVELOPE.value,
                "notice": ItemKind.GAP_NOTICE.value,
            },
        )
        items: list[SpoolItem] = []
        for sequence, data, kind in rows:
            if data is None:
                break  # an unnoticed gap: nothing past it may be sent yet
            items.append(SpoolItem(int(sequence), ItemKind(kind), bytes(data)))
        return items

    def mark_acked(self, sequence: int) -> None:
        """Record the verifier's acknowledgement up to ``sequence``; never lowers it.

        Gaps that end at or below the acknowledged sequence are forgotten (the verifier has
        their notice). Raises SequenceError for a sequence the spool never produced.
        """
        with self._transaction() as db:
            state = self._read_state(db)
            if sequence >= state.next_sequence:
                raise SequenceError(
                    f"ack of sequence {sequence} refused: the last spooled sequence is "
                    f"{state.next_sequence - 1}"
                )
            if sequence <= state.acked_sequence:
                return
            db.execute("UPDATE chain_state SET acked_sequence = ?", (sequence,))
            db.execute("DELETE FROM gaps WHERE last_sequence <= ?", (sequence,))

    def gaps_needing_notice(self) -> list[DroppedRange]:
        """Dropped ranges that have no signed GapNotice yet, oldest first."""
        rows = self._db.execute(
            "SELECT first_sequence, last_sequence, previous_sha256, last_sha256 FROM gaps "
            "WHERE notice IS NULL ORDER BY first_sequence"
        )
        return [DroppedRange(int(f), int(la), bytes(p), bytes(h)) for f, la, p, h in rows]

    def attach_gap_notice(self, gap: DroppedRange, notice_envelope_bytes: bytes) -> None:
        """Attach the signed GapNotice for ``gap``, exactly as read from gaps_needing_notice.

        Raises GapNoticeError when the gap is gone, already has a notice (a notice is never
        re-created: the verifier would see different bytes for one sequence), or grew since
        it was read (the notice would name the wrong range: sign a new one for the new range).
        """
        if not notice_envelope_bytes:
            raise GapNoticeError("a gap notice cannot be empty")
        with self._transaction() as db:
            row = db.execute(
                "SELECT last_sequence, previous_sha256, last_sha256, notice FROM gaps "
                "WHERE first_sequence = ?",
                (gap.first,),
            ).fetchone()
            if row is None:
                raise GapNoticeError(f"no gap starts at sequence {gap.first}")
            last, previous_sha256, last_sha256, notice = row
            if notice is not None:
                raise GapNoticeError(f"gap {gap.first}-{last} already has a notice")
            stored = DroppedRange(gap.first, int(last), bytes(previous_sha256), bytes(last_sha256))
            if stored != gap:
                raise GapNoticeError(
                    f"gap at {gap.first} is now {stored.first}-{stored.last}, "
                    f"not {gap.first}-{gap.last}: sign a notice for the current range"
                )
            db.execute(
                "UPDATE gaps SET notice = ? WHERE first_sequence = ?",
                (notice_envelope_bytes, gap.first),
            )

    def raw_samples(self, sequence: int) -> bytes | None:
        """The raw samples spooled with ``sequence`` (for audit pull), None if not retained."""
        row = self._db.execute(
            "SELECT raw_samples_zlib FROM entries WHERE sequence = ?", (sequence,)
        ).fetchone()
        return None if row is None else zlib.decompress(row[0])

    def stats(self) -> SpoolStats:
        """Counters for metrics, read in one consistent snapshot."""
        with self._transaction() as db:
            entries, stored_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored_bytes), 0) FROM entries"
            ).fetchone()
            (unnoticed,) = db.execute("SELECT COUNT(*) FROM gaps WHERE notice IS NULL").fetchone()
            next_sequence, acked, dropped_total = db.execute(
                "SELECT next_sequence, acked_sequence, dropped_total FROM chain_state"
            ).fetchone()
        return SpoolStats(
            entries=int(entries),
            stored_bytes=int(stored_bytes),
            dropped_total=int(dropped_total),
            acked_sequence=int(acked),
            next_sequence=int(next_sequence),
            gaps_awaiting_notice=int(unnoticed),
        )

    # -- opening -------------------------------------------------------------------------

    def _check_schema_version(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"spool schema version {version} is newer than this agent's {SCHEMA_VERSION}: "
                "run a newer agent, or move the spool file aside"
            )
        if version not in (0, SCHEMA_VERSION):
            raise SchemaVersionError(f"spool schema version {version} is not one this agent knows")

    def _configure_durability(self) -> None:
        # WAL: a crash (kill -9, power loss) leaves either the whole transaction or none of
        # it, and readers never block the one writer.
        mode = str(self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise SpoolError(f"spool needs WAL journaling, SQLite gave {mode!r}")
        # FULL, not WAL's usual NORMAL: NORMAL survives a process crash but may lose the
        # last commits on power loss. An append is acknowledged durable and its envelope may
        # already be at the verifier; losing it would make the agent re-sign a *different*
        # envelope under the same sequence, which the verifier must treat as equivocation.
        # The cost is one fsync per append or ack: a few per 10 s window, negligible.
        self._db.execute("PRAGMA synchronous=FULL")

    def _create_schema_if_new(self) -> None:
        with self._transaction() as db:
            # Re-read under the write lock: another opener may have created it meanwhile.
            if int(db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
                return
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT INTO chain_state VALUES (1, 1, ?, 0, 0)",
                (GENESIS_HASH,),
            )
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- transactions and state ----------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so the state read at the start of a call
        # cannot be changed by another writer before the call's own writes.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @staticmethod
    def _read_state(db: sqlite3.Connection) -> _ChainState:
        next_sequence, chain_head, acked = db.execute(
            "SELECT next_sequence, chain_head, acked_sequence FROM chain_state"
        ).fetchone()
        return _ChainState(int(next_sequence), bytes(chain_head), int(acked))

    # -- the size cap --------------------------------------------------------------------

    def _enforce_cap(self, db: sqlite3.Connection, acked: int) -> list[DroppedRange]:
        """Bring the spool under its cap; return the ranges dropped undelivered."""
        (total,) = db.execute("SELECT COALESCE(SUM(stored_bytes), 0) FROM entries").fetchone()
        excess = int(total) - self._max_bytes
        if excess <= 0:
            return []
        excess -= self._prune_acked(db, acked, excess)
        if excess <= 0:
            return []
        return self._drop_unacked(db, acked, excess)

    @staticmethod
    def _prune_acked(db: sqlite3.Connection, acked: int, excess: int) -> int:
        """Delete acknowledged entries oldest first until ``excess`` bytes are freed."""
        rows = db.execute(
            "SELECT sequence, stored_bytes FROM entries WHERE sequence <= ? ORDER BY sequence",
            (acked,),
        ).fetchall()
        freed, cutoff = 0, None
        for sequence, size in rows:
            if freed >= excess:
                break
            freed += int(size)
            cutoff = int(sequence)
        if cutoff is not None:
            db.execute("DELETE FROM entries WHERE sequence <= ?", (cutoff,))
        return freed

    def _drop_unacked(self, db: sqlite3.Connection, acked: int, excess: int) -> list[DroppedRange]:
        """Drop the oldest unacknowledged entries until ``excess`` bytes are freed.

        The entry just appended is never a victim: it alone fits the cap (checked before the
        transaction), so the older ones always cover the excess.
        """
        rows = db.execute(
            "SELECT sequence, stored_bytes, previous_sha256, envelope_sha256 FROM entries "
            "WHERE sequence > ? ORDER BY sequence",
            (acked,),
        ).fetchall()
        victims: list[tuple[int, bytes, bytes]] = []
        freed = 0
        for sequence, size, previous_sha256, sha256 in rows:
            if freed >= excess:
                break
            freed += int(size)
            victims.append((int(sequence), bytes(previous_sha256), bytes(sha256)))
        runs = _contiguous_runs(victims)
        for run in runs:
            db.execute("DELETE FROM entries WHERE sequence BETWEEN ? AND ?", (run.first, run.last))
            _record_gap(db, run)
        db.execute("UPDATE chain_state SET dropped_total = dropped_total + ?", (len(victims),))
        return runs

    def _log_drop_event(self, runs: list[DroppedRange]) -> None:
        count = sum(run.last - run.first + 1 for run in runs)
        ranges = ", ".join(
            str(run.first) if run.first == run.last else f"{run.first}-{run.last}" for run in runs
        )
        LOG.error(
            "SPOOL FULL: dropped %d undelivered evidence envelope(s), sequences %s, to stay "
            "under the spool cap of %d bytes; a signed gap notice will replace them",
            count,
            ranges,
            self._max_bytes,
        )


def _create_private_file(path: Path) -> None:
    """Create the spool file readable by its owner only; SQLite's -wal/-shm follow its mode.

    Raw samples name processes and jobs on the host, so other local users must not read them.
    """
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


def _contiguous_runs(victims: Iterable[tuple[int, bytes, bytes]]) -> list[DroppedRange]:
    """Group (sequence, previous_sha256, sha256) rows, in sequence order, into ranges."""
    runs: list[DroppedRange] = []
    for sequence, previous_sha256, sha256 in victims:
        if runs and runs[-1].last + 1 == sequence:
            runs[-1] = DroppedRange(runs[-1].first, sequence, runs[-1].previous_sha256, sha256)
        else:
            runs.append(DroppedRange(sequence, sequence, previous_sha256, sha256))
    return runs


def _record_gap(db: sqlite3.Connection, run: DroppedRange) -> None:
    """Extend the gap that ends just before ``run`` if it has no notice yet, else add one.

    A gap with a notice attached is frozen: the signed notice names its exact range.
    """
    extended = db.execute(
        "UPDATE gaps SET last_sequence = ?, last_sha256 = ? "
        "WHERE last_sequence = ? AND notice IS NULL",
        (run.last, run.last_sha256, run.first - 1),
    ).rowcount
    if extended == 0:
        db.execute(
            "INSERT INTO gaps VALUES (?, ?, ?, ?, NULL)",
            (run.first, run.last, run.previous_sha256, run.last_sha256),
        )
