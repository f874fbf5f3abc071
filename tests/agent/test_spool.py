"""Tests for the agent's durable spool, on real SQLite files under tmp_path.

Envelopes here are synthetic byte strings: the spool stores and hashes bytes, it never
parses them. Raw samples are empty unless a test needs them, so every entry's stored size is
``len(envelope) + ENTRY_OVERHEAD`` and cap arithmetic stays exact.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.spool import (
    SCHEMA_VERSION,
    CapacityError,
    DroppedRange,
    GapNoticeError,
    ItemKind,
    SchemaVersionError,
    SequenceError,
    Spool,
    SpoolError,
    SpoolItem,
)
from proto.envelope import GENESIS_HASH, envelope_sha256
from proto.errors import GpuattestError

REPO_ROOT = Path(__file__).resolve().parents[2]
ENVELOPE_SIZE = 100
ENTRY_OVERHEAD = len(zlib.compress(b""))  # the compressed empty raw-samples blob
ENTRY_SIZE = ENVELOPE_SIZE + ENTRY_OVERHEAD
THREE_ENTRIES = 3 * ENTRY_SIZE
ROOMY = 1_000_000


def envelope(sequence: int, size: int = ENVELOPE_SIZE) -> bytes:
    """A synthetic, distinct stand-in for a signed envelope of exactly ``size`` bytes."""
    return f"synthetic-envelope-{sequence}|".encode().ljust(size, b".")[:size]


def sha(sequence: int) -> bytes:
    return envelope_sha256(envelope(sequence))


def append_through(spool: Spool, last: int) -> None:
    """Append synthetic envelopes from the spool's next sequence up to ``last``."""
    for sequence in range(spool.next_sequence(), last + 1):
        spool.append(sequence, envelope(sequence), b"")


def sequences(items: list[SpoolItem]) -> list[int]:
    return [item.sequence for item in items]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.sqlite"


@pytest.fixture
def spool(path: Path) -> Spool:
    return Spool(path, max_bytes=ROOMY)


# -- append, pending, ack --------------------------------------------------------------


def test_new_spool_starts_at_sequence_one_and_genesis(spool: Spool) -> None:
    stats = spool.stats()
    assert (spool.next_sequence(), spool.chain_head(), spool.acked_sequence()) == (
        1,
        GENESIS_HASH,
        0,
    )
    assert (stats.entries, stats.stored_bytes, stats.dropped_total) == (0, 0, 0)
    assert spool.pending(0, 10) == []


def test_append_advances_sequence_and_chain_head(spool: Spool) -> None:
    append_through(spool, 3)
    assert spool.next_sequence() == 4
    assert spool.chain_head() == sha(3)


def test_pending_returns_envelopes_after_sequence_in_order(spool: Spool) -> None:
    append_through(spool, 5)
    items = spool.pending(2, 10)
    assert sequences(items) == [3, 4, 5]
    assert all(item.kind is ItemKind.ENVELOPE for item in items)
    assert [item.envelope_bytes for item in items] == [envelope(s) for s in (3, 4, 5)]


def test_pending_honours_limit(spool: Spool) -> None:
    append_through(spool, 5)
    assert sequences(spool.pending(0, 2)) == [1, 2]


def test_ack_is_monotonic_and_acked_entries_stay_pending_for_a_restored_verifier(
    spool: Spool,
) -> None:
    append_through(spool, 4)
    spool.mark_acked(3)
    spool.mark_acked(1)  # a verifier restored from backup acks lower: ignored
    assert spool.acked_sequence() == 3
    assert sequences(spool.pending(1, 10)) == [2, 3, 4]


def test_raw_samples_round_trip_compressed(spool: Spool) -> None:
    raw = b"synthetic sample row, power_w=300.0\n" * 200
    spool.append(1, envelope(1), raw)
    assert spool.raw_samples(1) == raw
    assert spool.raw_samples(2) is None
    assert spool.stats().stored_bytes < ENVELOPE_SIZE + len(raw)


@pytest.mark.parametrize(
    "sequence",
    [
        pytest.param(3, id="repeat"),
        pytest.param(5, id="skip"),
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
    ],
)
def test_append_refuses_a_sequence_that_is_not_the_next(spool: Spool, sequence: int) -> None:
    append_through(spool, 3)
    with pytest.raises(SequenceError, match="next sequence is 4"):
        spool.append(sequence, envelope(sequence), b"")
    assert (spool.next_sequence(), spool.chain_head(), spool.stats().entries) == (4, sha(3), 3)


def test_sequence_error_belongs_to_the_project_error_tree() -> None:
    assert issubclass(SequenceError, GpuattestError)


@pytest.mark.parametrize(
    "ack",
    [pytest.param(4, id="next-sequence"), pytest.param(100, id="far-future")],
)
def test_ack_of_a_sequence_never_spooled_is_refused(spool: Spool, ack: int) -> None:
    append_through(spool, 3)
    with pytest.raises(SequenceError, match="last spooled sequence is 3"):
        spool.mark_acked(ack)
    assert spool.acked_sequence() == 0


@pytest.mark.parametrize("max_bytes", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_non_positive_cap_is_refused(path: Path, max_bytes: int) -> None:
    with pytest.raises(SpoolError, match="cap must be positive"):
        Spool(path, max_bytes=max_bytes)


@pytest.mark.parametrize("limit", [pytest.param(0, id="zero"), pytest.param(-5, id="negative")])
def test_pending_limit_below_one_is_refused(spool: Spool, limit: int) -> None:
    with pytest.raises(SpoolError, match="at least 1"):
        spool.pending(0, limit)


# -- restart and crash -----------------------------------------------------------------


def spool_with_history(path: Path) -> Spool:
    """Entries, an ack, a noticed gap and an unnoticed one: every kind of state to resume."""
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 4)  # drops 1
    [first_gap] = spool.gaps_needing_notice()
    spool.attach_gap_notice(first_gap, b"synthetic-notice-1")
    append_through(spool, 5)  # drops 2, a new gap after the noticed one
    spool.mark_acked(1)
    return spool


def snapshot(spool: Spool) -> tuple[object, ...]:
    return (
        spool.stats(),
        spool.chain_head(),
        spool.gaps_needing_notice(),
        spool.pending(0, 100),
    )


def test_reopen_after_close_resumes_exactly(path: Path) -> None:
    spool = spool_with_history(path)
    before = snapshot(spool)
    spool.close()
    with Spool(path, max_bytes=THREE_ENTRIES) as reopened:
        assert snapshot(reopened) == before
        reopened.append(6, envelope(6), b"")  # and it goes on from where it stopped


def test_second_open_without_close_sees_every_committed_change(path: Path) -> None:
    abandoned = spool_with_history(path)
    before = snapshot(abandoned)
    del abandoned  # never closed, as after a crash
    with Spool(path, max_bytes=THREE_ENTRIES) as reopened:
        assert snapshot(reopened) == before


def test_spool_survives_kill_9_of_its_process(path: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from agent.spool import Spool
        from tests.agent.test_spool import append_through
        spool = Spool(Path({str(path)!r}), max_bytes={ROOMY})
        append_through(spool, 5)
        spool.mark_acked(2)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=REPO_ROOT, env=env, capture_output=True, check=False
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    # The write-ahead log is still there: the process died without a clean close.
    assert path.with_name(path.name + "-wal").exists()
    with Spool(path, max_bytes=ROOMY) as reopened:
        assert (reopened.next_sequence(), reopened.chain_head()) == (6, sha(5))
        assert reopened.acked_sequence() == 2
        assert sequences(reopened.pending(0, 10)) == [1, 2, 3, 4, 5]


def test_newer_schema_version_is_refused(path: Path) -> None:
    Spool(path, max_bytes=ROOMY).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaVersionError, match=r"version 2 is newer than this agent's 1"):
        Spool(path, max_bytes=ROOMY)


def test_spool_file_is_private_to_its_owner(path: Path) -> None:
    Spool(path, max_bytes=ROOMY).close()
    assert path.stat().st_mode & 0o077 == 0


# -- the size cap ----------------------------------------------------------------------


def test_over_cap_prunes_acknowledged_entries_first_without_dropping(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 3)
    spool.mark_acked(2)
    append_through(spool, 4)
    # Only as many acked entries go as the cap needs: 2 stays for audit pull.
    assert sequences(spool.pending(0, 10)) == [2, 3, 4]
    assert spool.stats().dropped_total == 0
    assert spool.gaps_needing_notice() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_over_cap_drops_oldest_unacknowledged_and_records_a_gap(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 3)
    spool.mark_acked(1)
    with caplog.at_level(logging.ERROR, logger="agent.spool"):
        append_through(spool, 5)  # 4 prunes acked 1; 5 must drop unacked 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "sequences 2," in errors[0].getMessage()
    assert f"cap of {THREE_ENTRIES} bytes" in errors[0].getMessage()
    assert spool.stats().dropped_total == 1
    assert spool.stats().stored_bytes <= THREE_ENTRIES
    assert spool.gaps_needing_notice() == [DroppedRange(2, 2, sha(1), sha(2))]


def test_contiguous_drops_extend_an_unnoticed_gap_one_log_line_each(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    with caplog.at_level(logging.ERROR, logger="agent.spool"):
        append_through(spool, 6)  # three drop events: 1, 2, 3
    assert [r.getMessage().split("sequences ")[1].split(",")[0] for r in caplog.records] == [
        "1",
        "2",
        "3",
    ]
    assert spool.stats().dropped_total == 3
    assert spool.gaps_needing_notice() == [DroppedRange(1, 3, GENESIS_HASH, sha(3))]


def test_one_append_can_drop_several_envelopes_in_one_event(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 3)
    with caplog.at_level(logging.ERROR, logger="agent.spool"):
        spool.append(4, envelope(4, size=2 * ENVELOPE_SIZE), b"")
    [record] = caplog.records
    assert "dropped 2 undelivered" in record.getMessage()
    assert "sequences 1-2," in record.getMessage()
    assert spool.gaps_needing_notice() == [DroppedRange(1, 2, GENESIS_HASH, sha(2))]


def test_drops_after_a_noticed_gap_open_a_new_gap(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 4)
    [gap] = spool.gaps_needing_notice()
    spool.attach_gap_notice(gap, b"synthetic-notice-1")
    append_through(spool, 5)
    assert spool.gaps_needing_notice() == [DroppedRange(2, 2, sha(1), sha(2))]


def test_entry_larger_than_the_cap_is_refused_and_changes_nothing(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 2)
    with pytest.raises(CapacityError, match="does not fit"):
        spool.append(3, envelope(3, size=THREE_ENTRIES), b"")
    assert (spool.next_sequence(), spool.stats().entries) == (3, 2)


# -- gap notices -----------------------------------------------------------------------


def test_pending_stops_before_an_unnoticed_gap(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 4)  # 1 dropped
    assert spool.pending(0, 10) == []


def test_attached_notice_takes_the_gap_place_in_pending(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 4)  # gap 1
    [gap] = spool.gaps_needing_notice()
    assert gap == DroppedRange(1, 1, GENESIS_HASH, sha(1))
    spool.attach_gap_notice(gap, b"synthetic-notice-1")
    append_through(spool, 5)  # gap 2, unnoticed, right after the noticed one
    assert spool.pending(0, 10) == [SpoolItem(1, ItemKind.GAP_NOTICE, b"synthetic-notice-1")]
    [second] = spool.gaps_needing_notice()
    spool.attach_gap_notice(second, b"synthetic-notice-2")
    assert [(i.sequence, i.kind) for i in spool.pending(0, 10)] == [
        (1, ItemKind.GAP_NOTICE),
        (2, ItemKind.GAP_NOTICE),
        (3, ItemKind.ENVELOPE),
        (4, ItemKind.ENVELOPE),
        (5, ItemKind.ENVELOPE),
    ]


def test_notice_of_a_multi_sequence_gap_sits_at_its_last_sequence(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 6)  # gap 1-3
    [gap] = spool.gaps_needing_notice()
    spool.attach_gap_notice(gap, b"synthetic-notice-1-3")
    assert sequences(spool.pending(0, 10)) == [3, 4, 5, 6]
    assert sequences(spool.pending(2, 10)) == [3, 4, 5, 6]  # an ack inside the gap
    assert sequences(spool.pending(3, 10)) == [4, 5, 6]


def test_acked_gaps_are_forgotten(path: Path) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 5)  # gap 1-2
    [gap] = spool.gaps_needing_notice()
    spool.attach_gap_notice(gap, b"synthetic-notice")
    spool.mark_acked(2)
    assert sequences(spool.pending(0, 10)) == [3, 4, 5]
    assert spool.stats().gaps_awaiting_notice == 0


def gap_already_noticed(spool: Spool) -> tuple[DroppedRange, bytes]:
    [gap] = spool.gaps_needing_notice()
    spool.attach_gap_notice(gap, b"synthetic-notice")
    return gap, b"a-different-notice"


def gap_that_grew(spool: Spool) -> tuple[DroppedRange, bytes]:
    [gap] = spool.gaps_needing_notice()
    append_through(spool, 5)  # drops 2, extending the unnoticed gap to 1-2
    return gap, b"synthetic-notice"


def gap_that_does_not_exist(spool: Spool) -> tuple[DroppedRange, bytes]:
    return DroppedRange(3, 3, sha(2), sha(3)), b"synthetic-notice"


def empty_notice(spool: Spool) -> tuple[DroppedRange, bytes]:
    [gap] = spool.gaps_needing_notice()
    return gap, b""


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(gap_already_noticed, "already has a notice", id="already-noticed"),
        pytest.param(gap_that_grew, "sign a notice for the current range", id="gap-grew"),
        pytest.param(gap_that_does_not_exist, "no gap starts at sequence 3", id="no-such-gap"),
        pytest.param(empty_notice, "cannot be empty", id="empty-notice"),
    ],
)
def test_attach_gap_notice_refusals(
    path: Path, setup: Callable[[Spool], tuple[DroppedRange, bytes]], message: str
) -> None:
    spool = Spool(path, max_bytes=THREE_ENTRIES)
    append_through(spool, 4)  # gap 1
    gap, notice = setup(spool)
    before = spool.pending(0, 10)
    with pytest.raises(GapNoticeError, match=message):
        spool.attach_gap_notice(gap, notice)
    assert spool.pending(0, 10) == before


# -- any interleaving ------------------------------------------------------------------

MACHINE_CAP = 1000


class SpoolMachine(RuleBasedStateMachine):
    """Appends, verifier acks, notices, restarts and crashes in any order.

    The model remembers every envelope ever appended, so hashes in gaps can be checked
    against the real chain.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "spool.sqlite"
        self.spool = Spool(self.path, max_bytes=MACHINE_CAP)
        self.abandoned: list[Spool] = []
        self.envelopes: dict[int, bytes] = {}
        self.notices: dict[int, tuple[int, bytes]] = {}  # gap last -> (gap first, notice)
        self.dropped_seen = 0

    @initialize()
    def start_with_one_envelope(self) -> None:
        self.append(size=50)

    @rule(size=st.integers(min_value=1, max_value=400))
    def append(self, size: int) -> None:
        sequence = self.spool.next_sequence()
        self.envelopes[sequence] = envelope(sequence, size)
        self.spool.append(sequence, self.envelopes[sequence], b"")

    @rule(data=st.data())
    def verifier_acks_something_it_was_sent(self, data: st.DataObject) -> None:
        items = self.spool.pending(self.spool.acked_sequence(), 1000)
        if items:
            self.spool.mark_acked(data.draw(st.sampled_from(sequences(items))))

    @rule(data=st.data())
    def restored_verifier_acks_lower(self, data: st.DataObject) -> None:
        acked = self.spool.acked_sequence()
        self.spool.mark_acked(data.draw(st.integers(min_value=0, max_value=acked)))
        assert self.spool.acked_sequence() == acked

    @rule()
    def agent_signs_notices(self) -> None:
        for gap in self.spool.gaps_needing_notice():
            notice = f"synthetic-notice-{gap.first}-{gap.last}".encode()
            self.spool.attach_gap_notice(gap, notice)
            self.notices[gap.last] = (gap.first, notice)

    @rule()
    def restart(self) -> None:
        self.spool.close()
        self.spool = Spool(self.path, max_bytes=MACHINE_CAP)

    @rule()
    def crash(self) -> None:
        self.abandoned.append(self.spool)  # left open, never closed again
        self.spool = Spool(self.path, max_bytes=MACHINE_CAP)

    @invariant()
    def pending_covers_every_unacked_sequence_in_order(self) -> None:
        expected = self.spool.acked_sequence() + 1
        for item in self.spool.pending(expected - 1, 10_000):
            if item.kind is ItemKind.ENVELOPE:
                assert item.sequence == expected
                assert item.envelope_bytes == self.envelopes[item.sequence]
            else:
                first, notice = self.notices[item.sequence]
                assert first <= expected <= item.sequence
                assert item.envelope_bytes == notice
            expected = item.sequence + 1
        if expected < self.spool.next_sequence():
            # The stream may only stop early at a gap still waiting for its notice.
            assert [gap.first for gap in self.spool.gaps_needing_notice()][:1] == [expected]

    @invariant()
    def gaps_name_the_real_hashes_around_them(self) -> None:
        for gap in self.spool.gaps_needing_notice():
            before = (
                GENESIS_HASH if gap.first == 1 else envelope_sha256(self.envelopes[gap.first - 1])
            )
            assert gap.previous_sha256 == before
            assert gap.last_sha256 == envelope_sha256(self.envelopes[gap.last])

    @invariant()
    def chain_cap_and_counter_hold(self) -> None:
        stats = self.spool.stats()
        last = stats.next_sequence - 1
        assert self.spool.chain_head() == envelope_sha256(self.envelopes[last])
        assert stats.stored_bytes <= MACHINE_CAP
        assert stats.dropped_total >= self.dropped_seen
        self.dropped_seen = stats.dropped_total

    def teardown(self) -> None:
        self.spool.close()
        for spool in self.abandoned:
            spool.close()
        self.directory.cleanup()


SpoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestSpoolMachine = SpoolMachine.TestCase
