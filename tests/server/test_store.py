"""The verifier's evidence store, against a real database (no mocks).

Every test reaches the database through the ``store_url`` fixture, which runs it on SQLite
and on PostgreSQL (a throwaway server, see tests/conftest.py; skipped without its binaries).
"""

from __future__ import annotations

import hashlib
import math
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import MetaData, create_engine, make_url, select, text

from proto.envelope import GENESIS_HASH
from server.records import (
    AcceptedEnvelope,
    AgentState,
    AttributedProcess,
    GapRecord,
    GpuVerdict,
    KeyRecord,
    NonceRecord,
)
from server.store import (
    ENROLMENT_REFUSALS,
    EnrolmentRefused,
    Store,
    StoreError,
    StoreUnavailableError,
)
from server.store import engine as store_engine
from server.store.engine import SQLITE_BUSY_TIMEOUT_MS, create_store_engine, database_url
from tests.server.window_counters import windows_counted

NOW = 1_700_000_000_000_000_000
SECOND = 1_000_000_000
HOUR = 3600 * SECOND
WINDOW = 10 * SECOND
EVIDENCE_TYPE = "application/vnd.gpuattest.evidence.v1+protobuf"
GAP_TYPE = "application/vnd.gpuattest.gap.v1+protobuf"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database under test: a SQLite file, or a database on the session's PostgreSQL."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_store_url")
        return url
    return f"sqlite:///{tmp_path / 'evidence.db'}"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url) as opened:
        yield opened


@pytest.fixture
def enrolled(store: Store) -> Store:
    """A store with agent-a on host-a (key-a) and agent-b on host-b (key-b)."""
    _enrol(store, "agent-a", "host-a", "key-a")
    _enrol(store, "agent-b", "host-b", "key-b")
    return store


# -- helpers (synthetic values only) ---------------------------------------------------------


def _token(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def _enrol(store: Store, agent_id: str, hostname: str, key_id: str, at: int = NOW) -> None:
    token = _token(f"token-for-{key_id}")
    store.add_enrol_token(token, hostname, expires_unix_ns=at + HOUR, now_unix_ns=at)
    store.enroll(token, hostname, agent_id, _public_key(key_id), key_id, now_unix_ns=at)


def _public_key(key_id: str) -> bytes:
    return hashlib.sha256(b"public-key/" + key_id.encode()).digest()


def _gpu(index: int, sequence: int) -> GpuVerdict:
    start = NOW + sequence * WINDOW
    return GpuVerdict(
        gpu_index=index,
        gpu_uuid=f"GPU-synthetic-{index}",
        start_unix_ns=start,
        end_unix_ns=start + WINDOW,
        sample_count=100,
        features={"power_mean_w": 250.0 + index, "util_duty_cycle": 0.875},
        verdict="training",
        confidence=0.9375,
        model_version="model-test-1",
    )


def _envelope(
    agent_id: str,
    sequence: int,
    *,
    gpus: int = 2,
    nonce: bytes = b"",
    processes: tuple[AttributedProcess, ...] = (),
) -> AcceptedEnvelope:
    # Bytes that are not UTF-8 and hold NULs: storage must be byte-exact, not text.
    body = b"\x00\xff\xfe" + f"{agent_id}/{sequence}".encode() + bytes(range(256))
    digest = hashlib.sha256(body).digest()
    return AcceptedEnvelope(
        agent_id=agent_id,
        sequence=sequence,
        envelope=body,
        envelope_sha256=digest,
        chain_head_sha256=digest,
        payload_type=EVIDENCE_TYPE,
        received_unix_ns=NOW + sequence * WINDOW + SECOND,
        window_start_unix_ns=NOW + sequence * WINDOW,
        window_end_unix_ns=NOW + (sequence + 1) * WINDOW,
        source="synthetic-replay",
        nonce=nonce,
        gpus=tuple(_gpu(index, sequence) for index in range(gpus)),
        processes=processes,
    )


def _gap_notice(agent_id: str, first_missing: int, last_missing: int) -> AcceptedEnvelope:
    body = f"gap notice {agent_id} {first_missing}..{last_missing}".encode()
    return AcceptedEnvelope(
        agent_id=agent_id,
        sequence=last_missing,
        envelope=body,
        envelope_sha256=hashlib.sha256(body).digest(),
        chain_head_sha256=hashlib.sha256(b"the lost envelope").digest(),
        payload_type=GAP_TYPE,
        received_unix_ns=NOW + last_missing * WINDOW,
        window_start_unix_ns=0,
        window_end_unix_ns=0,
        source="",
        nonce=b"",
        declared_gap=(first_missing, last_missing),
    )


def _snapshot(store_url: str) -> dict[str, list[str]]:
    """Every row of every table, read with a plain engine: compare before and after."""
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            metadata = MetaData()
            metadata.reflect(conn)
            return {
                name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
                for name, table in metadata.tables.items()
            }
    finally:
        engine.dispose()


def _rows(store_url: str, query: str) -> list[tuple[Any, ...]]:
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


# -- enrolment -------------------------------------------------------------------------------


def test_enrolment_starts_the_agent_at_genesis(store: Store) -> None:
    _enrol(store, "agent-a", "host-a", "key-a")

    assert store.agent_state("agent-a") == AgentState("agent-a", 0, GENESIS_HASH)
    assert store.key("key-a") == KeyRecord("key-a", "agent-a", _public_key("key-a"), False)
    assert store.agent_state("agent-unknown") is None
    assert store.key("key-unknown") is None


def test_a_token_for_any_host_enrols_whichever_host_uses_it(store: Store) -> None:
    store.add_enrol_token(_token("any"), "", expires_unix_ns=NOW + HOUR, now_unix_ns=NOW)

    store.enroll(_token("any"), "gpu-node-17", "agent-x", b"pk", "key-x", now_unix_ns=NOW)

    assert [a.hostname for a in store.list_agents()] == ["gpu-node-17"]


def test_a_second_key_for_the_same_host_rotates_without_touching_the_chain(
    enrolled: Store,
) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1)])
    state = enrolled.agent_state("agent-a")

    _enrol(enrolled, "agent-a", "host-a", "key-a2", at=NOW + 1)

    assert enrolled.agent_state("agent-a") == state
    assert enrolled.key("key-a2") == KeyRecord("key-a2", "agent-a", _public_key("key-a2"), False)
    assert enrolled.key("key-a") == KeyRecord("key-a", "agent-a", _public_key("key-a"), False)


@dataclass(frozen=True)
class Refusal:
    """Arrange a store, then the enrolment attempt that must be refused."""

    reason: str
    arrange: Callable[[Store], None]
    token: str
    hostname: str = "host-a"
    agent_id: str = "agent-new"
    key_id: str = "key-new"
    at: int = NOW


def _add_token(name: str, hostname: str = "", expires: int = NOW + HOUR) -> Callable[[Store], None]:
    return lambda s: s.add_enrol_token(_token(name), hostname, expires, NOW - HOUR)


def _used_token(s: Store) -> None:
    _add_token("t")(s)
    s.enroll(_token("t"), "host-a", "agent-first", b"pk", "key-first", NOW)


def _existing_agent_and_token(s: Store) -> None:
    _enrol(s, "agent-a", "host-a", "key-a")
    _add_token("t")(s)


REFUSALS = [
    pytest.param(Refusal("unknown_token", _add_token("other"), "t"), id="unknown-token"),
    pytest.param(Refusal("token_used", _used_token, "t"), id="token-used-before"),
    pytest.param(Refusal("token_expired", _add_token("t", expires=NOW), "t"), id="expires-now"),
    pytest.param(
        Refusal("token_expired", _add_token("t", expires=NOW - 1), "t"), id="expired-earlier"
    ),
    pytest.param(
        Refusal("host_mismatch", _add_token("t", hostname="host-b"), "t"), id="token-for-other-host"
    ),
    pytest.param(
        Refusal("host_mismatch", _existing_agent_and_token, "t", "host-b", agent_id="agent-a"),
        id="agent-enrolled-on-other-host",
    ),
    pytest.param(
        Refusal("key_already_enrolled", _existing_agent_and_token, "t", key_id="key-a"),
        id="key-taken-by-other-agent",
    ),
    pytest.param(
        Refusal(
            "key_already_enrolled",
            _existing_agent_and_token,
            "t",
            agent_id="agent-a",
            key_id="key-a",
        ),
        id="key-enrolled-again",
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refused_enrolment_changes_nothing(
    store: Store, store_url: str, refusal: Refusal
) -> None:
    refusal.arrange(store)
    before = _snapshot(store_url)

    with pytest.raises(EnrolmentRefused) as refused:
        store.enroll(
            _token(refusal.token),
            refusal.hostname,
            refusal.agent_id,
            b"new-public-key",
            refusal.key_id,
            refusal.at,
        )

    assert refused.value.reason == refusal.reason
    assert refused.value.reason in ENROLMENT_REFUSALS
    assert _snapshot(store_url) == before


def test_a_token_is_used_once_by_racing_callers(store: Store, store_url: str) -> None:
    rounds = 6
    for round_ in range(rounds):
        store.add_enrol_token(_token(f"race-{round_}"), "", NOW + HOUR, NOW)
    # Two stores on one file: two verifier processes, not just two threads of one pool.
    with Store.open(store_url) as rival:
        for round_ in range(rounds):
            assert sorted(_race_for_token(store, rival, round_)) == ["enrolled", "token_used"]

    assert len(store.list_agents()) == rounds


def _race_for_token(first: Store, second: Store, round_: int) -> list[str]:
    start = threading.Barrier(2)

    def attempt(store: Store, name: str) -> str:
        start.wait()
        try:
            store.enroll(
                _token(f"race-{round_}"),
                f"host-{name}",
                f"agent-{round_}-{name}",
                b"pk",
                f"key-{round_}-{name}",
                NOW,
            )
        except EnrolmentRefused as refused:
            return refused.reason
        return "enrolled"

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = [pool.submit(attempt, first, "one"), pool.submit(attempt, second, "two")]
        return [outcome.result() for outcome in outcomes]


def test_adding_the_same_token_twice_is_an_error(store: Store) -> None:
    store.add_enrol_token(_token("t"), "", NOW + HOUR, NOW)

    with pytest.raises(StoreError):
        store.add_enrol_token(_token("t"), "host-a", NOW + HOUR, NOW)


# -- keys --------------------------------------------------------------------------------------


def test_revoke_key(enrolled: Store, store_url: str) -> None:
    assert enrolled.revoke_key("key-a", NOW + 5) is True
    assert enrolled.key("key-a") == KeyRecord("key-a", "agent-a", _public_key("key-a"), True)
    assert enrolled.key("key-b") == KeyRecord("key-b", "agent-b", _public_key("key-b"), False)

    # Revoking again still reports the key, and keeps the first revocation time.
    assert enrolled.revoke_key("key-a", NOW + 9) is True
    assert _rows(store_url, "SELECT revoked_at_unix_ns FROM keys WHERE key_id = 'key-a'") == [
        (NOW + 5,)
    ]


def test_revoking_an_unknown_key_reports_false(enrolled: Store, store_url: str) -> None:
    before = _snapshot(store_url)

    assert enrolled.revoke_key("key-unknown", NOW) is False
    assert _snapshot(store_url) == before


# -- storing evidence -------------------------------------------------------------------------


def test_stored_envelopes_round_trip_byte_exact_and_advance_the_chain(enrolled: Store) -> None:
    batch = [_envelope("agent-a", 1), _envelope("agent-a", 2), _envelope("agent-a", 3)]

    assert enrolled.store_accepted(batch) == 3

    for envelope in batch:
        assert enrolled.envelope_bytes("agent-a", envelope.sequence) == envelope.envelope
        assert enrolled.stored_envelope_sha256("agent-a", envelope.sequence) == (
            envelope.envelope_sha256
        )
    assert enrolled.agent_state("agent-a") == AgentState("agent-a", 3, batch[-1].chain_head_sha256)
    assert enrolled.agent_state("agent-b") == AgentState("agent-b", 0, GENESIS_HASH)
    assert enrolled.count_envelopes() == 3
    assert enrolled.envelope_bytes("agent-a", 4) is None
    assert enrolled.stored_envelope_sha256("agent-b", 1) is None


def test_storing_again_is_a_no_op(enrolled: Store, store_url: str) -> None:
    batch = [_envelope("agent-a", 1), _envelope("agent-a", 2)]
    enrolled.store_accepted(batch)
    before = _snapshot(store_url)

    assert enrolled.store_accepted(batch) == 0
    assert _snapshot(store_url) == before


def test_only_new_envelopes_are_stored_and_counted(enrolled: Store) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1), _envelope("agent-a", 2)])

    stored = enrolled.store_accepted(
        [_envelope("agent-a", 2), _envelope("agent-a", 3), _envelope("agent-a", 3)]
    )

    assert stored == 1
    assert enrolled.count_envelopes() == 3
    assert enrolled.agent_state("agent-a") == AgentState(
        "agent-a", 3, _envelope("agent-a", 3).chain_head_sha256
    )


def test_one_batch_may_carry_several_agents(enrolled: Store) -> None:
    batch = [_envelope("agent-a", 1), _envelope("agent-b", 1), _envelope("agent-a", 2)]

    assert enrolled.store_accepted(batch) == 3

    assert enrolled.agent_state("agent-a") == AgentState("agent-a", 2, batch[2].envelope_sha256)
    assert enrolled.agent_state("agent-b") == AgentState("agent-b", 1, batch[1].envelope_sha256)


def test_the_chain_head_never_moves_backwards(enrolled: Store) -> None:
    enrolled.store_accepted([_envelope("agent-a", 5)])

    assert enrolled.store_accepted([_envelope("agent-a", 3)]) == 1

    assert enrolled.agent_state("agent-a") == AgentState(
        "agent-a", 5, _envelope("agent-a", 5).chain_head_sha256
    )


def test_a_gap_notice_records_a_declared_gap_and_moves_the_chain_past_it(
    enrolled: Store, store_url: str
) -> None:
    notice = _gap_notice("agent-a", 2, 4)

    assert enrolled.store_accepted([_envelope("agent-a", 1), notice]) == 2

    assert enrolled.agent_state("agent-a") == AgentState("agent-a", 4, notice.chain_head_sha256)
    assert enrolled.envelope_bytes("agent-a", 4) == notice.envelope
    assert _rows(
        store_url, "SELECT agent_id, first_missing, last_missing, kind, detected_unix_ns FROM gaps"
    ) == [("agent-a", 2, 4, "declared", notice.received_unix_ns)]


def test_a_challenge_answer_uses_up_its_nonce(enrolled: Store) -> None:
    answered = NonceRecord(b"\x01" * 32, "agent-a", NOW + HOUR, used=False)
    unanswered = NonceRecord(b"\x02" * 32, "agent-a", NOW + HOUR, used=False)
    enrolled.add_nonce(answered)
    enrolled.add_nonce(unanswered)

    enrolled.store_accepted([_envelope("agent-a", 1, nonce=answered.nonce)])

    assert enrolled.nonce(answered.nonce) == replace(answered, used=True)
    assert enrolled.nonce(unanswered.nonce) == unanswered


def test_processes_are_stored_as_the_agent_listed_them(enrolled: Store, store_url: str) -> None:
    processes = (
        AttributedProcess(0, 4242, 70_000, "slurm_job", "1234", trusted=True),
        AttributedProcess(1, 4242, 70_000, "slurm_job", "1234", trusted=True),
        AttributedProcess(1, 999, 512, "unattributed", "", trusted=False),
    )

    enrolled.store_accepted([_envelope("agent-a", 1, processes=processes)])

    rows = _rows(
        store_url,
        "SELECT gpu_index, pid, used_memory_mib, job_kind, job_id, trusted FROM processes "
        "ORDER BY process_index",
    )
    assert [(*row[:5], bool(row[5])) for row in rows] == [
        (p.gpu_index, p.pid, p.used_memory_mib, p.job_kind, p.job_id, p.trusted) for p in processes
    ]


def test_evidence_from_an_agent_never_enrolled_stores_nothing(
    enrolled: Store, store_url: str
) -> None:
    before = _snapshot(store_url)

    with pytest.raises(StoreError, match="agent-ghost"):
        enrolled.store_accepted([_envelope("agent-a", 1), _envelope("agent-ghost", 1)])

    assert _snapshot(store_url) == before


def test_an_envelope_listing_one_gpu_twice_stores_nothing(enrolled: Store, store_url: str) -> None:
    before = _snapshot(store_url)
    envelope = _envelope("agent-a", 2, gpus=1)
    twice = replace(envelope, gpus=envelope.gpus * 2)

    with pytest.raises(StoreError, match="conflict"):
        enrolled.store_accepted([_envelope("agent-a", 1), twice])

    assert _snapshot(store_url) == before


@pytest.mark.parametrize(
    "declared",
    [pytest.param((4, 2), id="first-after-last"), pytest.param((0, 2), id="sequence-zero")],
)
def test_a_malformed_declared_gap_is_refused_before_storing(
    enrolled: Store, store_url: str, declared: tuple[int, int]
) -> None:
    before = _snapshot(store_url)
    notice = replace(_gap_notice("agent-a", 1, 2), declared_gap=declared)

    with pytest.raises(ValueError, match="gap range"):
        enrolled.store_accepted([_envelope("agent-a", 1), notice])

    assert _snapshot(store_url) == before


def test_an_empty_batch_stores_nothing(enrolled: Store) -> None:
    assert enrolled.store_accepted([]) == 0


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(max_size=2048),
    features=st.dictionaries(st.text(max_size=24), st.floats(), max_size=8),
)
def test_any_envelope_bytes_and_features_round_trip(
    enrolled: Store, body: bytes, features: dict[str, float]
) -> None:
    sequence = enrolled.count_envelopes() + 1
    gpu = replace(_gpu(0, sequence), features=features)
    envelope = replace(_envelope("agent-a", sequence), envelope=body, gpus=(gpu,))

    enrolled.store_accepted([envelope])

    assert enrolled.envelope_bytes("agent-a", sequence) == body
    [window] = enrolled.list_windows("agent-a", since_unix_ns=gpu.start_unix_ns, limit=1)
    assert window.features.keys() == features.keys()
    for name, value in features.items():
        stored = window.features[name]
        assert stored == value or (math.isnan(stored) and math.isnan(value))


# -- gaps and liveness ------------------------------------------------------------------------


def test_a_gap_is_recorded_once_per_agent_range_and_kind(enrolled: Store) -> None:
    observed = GapRecord("agent-a", 3, 5, "observed", NOW)

    enrolled.record_gap(observed)
    enrolled.record_gap(replace(observed, detected_unix_ns=NOW + SECOND))
    enrolled.record_gap(replace(observed, kind="declared"))
    enrolled.record_gap(replace(observed, last_missing=6))
    enrolled.record_gap(replace(observed, agent_id="agent-b"))

    gaps = {agent.agent_id: agent.gaps for agent in enrolled.list_agents()}
    assert gaps == {"agent-a": 3, "agent-b": 1}


@pytest.mark.parametrize(
    ("gap", "error"),
    [
        pytest.param(GapRecord("agent-a", 3, 5, "guessed", NOW), "kind", id="unknown-kind"),
        pytest.param(GapRecord("agent-a", 5, 3, "observed", NOW), "range", id="first-after-last"),
        pytest.param(GapRecord("agent-a", 0, 3, "observed", NOW), "range", id="sequence-zero"),
    ],
)
def test_malformed_gaps_are_refused(enrolled: Store, gap: GapRecord, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        enrolled.record_gap(gap)


def test_a_gap_for_an_unknown_agent_is_refused(enrolled: Store) -> None:
    with pytest.raises(StoreError):
        enrolled.record_gap(GapRecord("agent-ghost", 1, 1, "observed", NOW))


def test_touch_moves_last_seen_forward_only(enrolled: Store) -> None:
    enrolled.touch_agent("agent-a", NOW + 20)
    enrolled.touch_agent("agent-a", NOW + 10)
    enrolled.touch_agent("agent-ghost", NOW)  # unknown agents are ignored

    last_seen = {agent.agent_id: agent.last_seen_unix_ns for agent in enrolled.list_agents()}
    assert last_seen == {"agent-a": NOW + 20, "agent-b": 0}


# -- nonces ------------------------------------------------------------------------------------


def test_nonce_round_trip(enrolled: Store) -> None:
    issued = NonceRecord(b"\x07" * 32, "agent-b", NOW + 30 * SECOND, used=False)

    enrolled.add_nonce(issued)

    assert enrolled.nonce(issued.nonce) == issued
    assert enrolled.nonce(b"\x08" * 32) is None


@pytest.mark.parametrize(
    ("nonce", "error"),
    [
        pytest.param(NonceRecord(b"n" * 32, "agent-a", NOW, used=True), ValueError, id="used"),
        pytest.param(
            NonceRecord(b"n" * 32, "agent-ghost", NOW, used=False), StoreError, id="ghost"
        ),
        pytest.param(NonceRecord(b"i" * 32, "agent-b", NOW, used=False), StoreError, id="reissued"),
    ],
)
def test_nonces_that_cannot_be_issued(
    enrolled: Store, store_url: str, nonce: NonceRecord, error: type[Exception]
) -> None:
    enrolled.add_nonce(NonceRecord(b"i" * 32, "agent-a", NOW + HOUR, used=False))
    before = _snapshot(store_url)

    with pytest.raises(error):
        enrolled.add_nonce(nonce)

    assert _snapshot(store_url) == before


def test_purging_removes_only_expired_nonces(enrolled: Store) -> None:
    enrolled.add_nonce(NonceRecord(b"old" * 8, "agent-a", NOW, used=False))
    enrolled.add_nonce(NonceRecord(b"new" * 8, "agent-a", NOW + 1, used=False))

    assert enrolled.purge_expired_nonces(NOW) == 1

    assert enrolled.nonce(b"old" * 8) is None
    assert enrolled.nonce(b"new" * 8) is not None


# -- queries ------------------------------------------------------------------------------------


def test_list_agents_summarises_each_agent(enrolled: Store) -> None:
    _enrol(enrolled, "agent-c", "host-c", "key-c")
    enrolled.store_accepted([_envelope("agent-b", 1, gpus=3), _envelope("agent-b", 2, gpus=3)])
    enrolled.store_accepted([_gap_notice("agent-b", 3, 3)])
    enrolled.store_accepted([_envelope("agent-c", 1, gpus=1)])
    enrolled.revoke_key("key-c", NOW)

    summaries = {agent.agent_id: agent for agent in enrolled.list_agents()}

    assert [agent.agent_id for agent in enrolled.list_agents()] == ["agent-a", "agent-b", "agent-c"]
    a, b, c = summaries["agent-a"], summaries["agent-b"], summaries["agent-c"]
    assert (a.hostname, a.key_id, a.revoked, a.acked_sequence) == ("host-a", "key-a", False, 0)
    assert (a.windows_stored, a.gaps, a.last_seen_unix_ns) == (0, 0, 0)
    assert (b.hostname, b.key_id, b.revoked, b.acked_sequence) == ("host-b", "key-b", False, 3)
    assert (b.windows_stored, b.gaps) == (6, 1)
    assert b.last_seen_unix_ns == _gap_notice("agent-b", 3, 3).received_unix_ns
    assert (c.key_id, c.revoked, c.windows_stored) == ("key-c", True, 1)


def test_list_agents_shows_the_newest_key_still_valid(enrolled: Store) -> None:
    _enrol(enrolled, "agent-a", "host-a", "key-a2", at=NOW + 1)
    _enrol(enrolled, "agent-a", "host-a", "key-a3", at=NOW + 2)
    enrolled.revoke_key("key-a3", NOW + 3)

    [agent_a] = [a for a in enrolled.list_agents() if a.agent_id == "agent-a"]

    assert (agent_a.key_id, agent_a.revoked) == ("key-a2", False)


def test_list_windows_orders_by_agent_sequence_and_gpu(enrolled: Store) -> None:
    enrolled.store_accepted([_envelope("agent-b", 1, gpus=2), _envelope("agent-b", 2, gpus=2)])
    enrolled.store_accepted([_envelope("agent-a", 2, gpus=3)])
    reversed_gpus = replace(
        _envelope("agent-a", 1), gpus=tuple(reversed(_envelope("agent-a", 1, gpus=3).gpus))
    )
    enrolled.store_accepted([reversed_gpus])

    windows = enrolled.list_windows()

    assert [(w.agent_id, w.sequence, w.gpu_index) for w in windows] == [
        ("agent-a", 1, 0), ("agent-a", 1, 1), ("agent-a", 1, 2),
        ("agent-a", 2, 0), ("agent-a", 2, 1), ("agent-a", 2, 2),
        ("agent-b", 1, 0), ("agent-b", 1, 1),
        ("agent-b", 2, 0), ("agent-b", 2, 1),
    ]  # fmt: skip


def test_list_windows_carries_the_verdict_and_the_envelope_source(enrolled: Store) -> None:
    envelope = _envelope("agent-a", 1, gpus=1)
    enrolled.store_accepted([envelope])

    [window] = enrolled.list_windows()

    gpu = envelope.gpus[0]
    assert (window.gpu_uuid, window.start_unix_ns, window.end_unix_ns) == (
        gpu.gpu_uuid,
        gpu.start_unix_ns,
        gpu.end_unix_ns,
    )
    assert (window.verdict, window.confidence, window.model_version) == (
        gpu.verdict,
        gpu.confidence,
        gpu.model_version,
    )
    assert (window.source, window.features) == (envelope.source, gpu.features)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param({}, [("agent-a", 1), ("agent-a", 2), ("agent-b", 1)], id="all"),
        pytest.param({"agent_id": "agent-b"}, [("agent-b", 1)], id="one-agent"),
        pytest.param({"agent_id": "agent-ghost"}, [], id="unknown-agent"),
        pytest.param(
            {"since_unix_ns": NOW + 2 * WINDOW}, [("agent-a", 2)], id="since-a-window-start"
        ),
        pytest.param({"since_unix_ns": NOW + WINDOW + 1}, [("agent-a", 2)], id="since-mid-window"),
        pytest.param({"limit": 2}, [("agent-a", 1), ("agent-a", 2)], id="limit"),
        pytest.param({"limit": 0}, [], id="limit-zero"),
    ],
)
def test_list_windows_filters(
    enrolled: Store, query: dict[str, Any], expected: list[tuple[str, int]]
) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1, gpus=1), _envelope("agent-a", 2, gpus=1)])
    enrolled.store_accepted([_envelope("agent-b", 1, gpus=1)])

    windows = enrolled.list_windows(**query)

    assert [(w.agent_id, w.sequence) for w in windows] == expected


def test_list_windows_refuses_a_negative_limit(enrolled: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        enrolled.list_windows(limit=-1)


# -- the per-agent window counter ---------------------------------------------------------------


def test_the_counter_adds_only_windows_actually_stored(enrolled: Store, store_url: str) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1, gpus=3), _envelope("agent-a", 2, gpus=3)])
    assert windows_counted(store_url) == {"agent-a": 6, "agent-b": 0}

    # A resend, and a batch repeating stored and new envelopes (one of them twice).
    enrolled.store_accepted([_envelope("agent-a", 1, gpus=3), _envelope("agent-a", 2, gpus=3)])
    enrolled.store_accepted(
        [_envelope("agent-a", 2, gpus=3), _envelope("agent-b", 1), _envelope("agent-b", 1)]
    )

    assert windows_counted(store_url) == {"agent-a": 6, "agent-b": 2}


def test_a_failed_store_counts_nothing(enrolled: Store, store_url: str) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1)])
    one_gpu_twice = replace(_envelope("agent-a", 3), gpus=(_gpu(0, 3), _gpu(0, 3)))

    with pytest.raises(StoreError):
        enrolled.store_accepted([_envelope("agent-a", 2), one_gpu_twice])

    assert windows_counted(store_url) == {"agent-a": 2, "agent-b": 0}


def test_gap_notices_and_envelopes_without_gpus_count_no_windows(
    enrolled: Store, store_url: str
) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1, gpus=0), _gap_notice("agent-a", 2, 4)])

    assert windows_counted(store_url) == {"agent-a": 0, "agent-b": 0}


_BATCHES = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["agent-a", "agent-b"]),
            st.integers(min_value=1, max_value=12),
            st.integers(min_value=0, max_value=4),
        ),
        min_size=1,
        max_size=6,
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=_BATCHES)
def test_the_counter_always_equals_a_count_of_the_windows(
    enrolled: Store, store_url: str, batches: list[list[tuple[str, int, int]]]
) -> None:
    # Examples share the database: later ones mostly resend what earlier ones stored.
    for batch in batches:
        enrolled.store_accepted([_envelope(a, n, gpus=gpus) for a, n, gpus in batch])

        counted = windows_counted(store_url)
        assert {a.agent_id: a.windows_stored for a in enrolled.list_agents()} == counted


def test_list_agents_reads_the_counter_not_the_windows(enrolled: Store, store_url: str) -> None:
    enrolled.store_accepted([_envelope("agent-a", 1)])
    engine = create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE agents SET windows_stored = 12345 WHERE agent_id = 'agent-a'")
            )
    finally:
        engine.dispose()

    summaries = {agent.agent_id: agent.windows_stored for agent in enrolled.list_agents()}

    assert summaries == {"agent-a": 12345, "agent-b": 0}


def test_two_replicas_storing_the_same_envelopes_count_each_window_once(
    enrolled: Store, store_url: str
) -> None:
    rounds = 5
    batches = [
        [
            _envelope(agent, 4 * round_ + n, gpus=3)
            for n in range(4)
            for agent in ("agent-a", "agent-b")
        ]
        for round_ in range(rounds)
    ]
    # Two stores on one database: two verifier processes, each sent the same envelopes
    # (an agent resending to the other replica after a timeout).
    with Store.open(store_url) as rival:
        stored = [sum(_race_to_store(enrolled, rival, batch)) for batch in batches]

    assert stored == [8] * rounds
    assert windows_counted(store_url) == {"agent-a": 3 * 4 * rounds, "agent-b": 3 * 4 * rounds}


def _race_to_store(first: Store, second: Store, batch: list[AcceptedEnvelope]) -> list[int]:
    start = threading.Barrier(2)

    def attempt(store: Store) -> int:
        start.wait()
        return store.store_accepted(batch)

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = [pool.submit(attempt, first), pool.submit(attempt, second)]
        return [outcome.result() for outcome in outcomes]


# -- SQLite specifics ---------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_foreign_keys(store: Store, store_url: str) -> None:
    url = make_url(store_url)
    if url.get_backend_name() != "sqlite":
        pytest.skip("SQLite only")

    # WAL is a property of the file: any connection sees it.
    with sqlite3.connect(str(url.database)) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_sqlite_still_locked_after_the_busy_timeout_is_retryable(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(store_url)
    if url.get_backend_name() != "sqlite":
        pytest.skip("SQLite only")
    monkeypatch.setattr(store_engine, "SQLITE_BUSY_TIMEOUT_MS", 50)
    with Store.open(store_url) as store, sqlite3.connect(str(url.database)) as rival:
        rival.execute("BEGIN IMMEDIATE")  # another verifier holds the write lock

        with pytest.raises(StoreUnavailableError, match="locked"):
            store.touch_agent("agent-a", NOW)
        rival.rollback()
        store.touch_agent("agent-a", NOW)  # and the store works again once it is released


# -- database URLs and reachability -------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        pytest.param("postgresql://u@db:5432/gpuattest", "postgresql+psycopg", id="postgresql"),
        pytest.param("postgres://u@db/gpuattest", "postgresql+psycopg", id="postgres-alias"),
        pytest.param("postgresql+psycopg://u@db/gpuattest", "postgresql+psycopg", id="explicit"),
        pytest.param("sqlite:////var/lib/gpuattest/verifier.db", "sqlite", id="sqlite"),
    ],
)
def test_database_urls_pick_the_driver(given: str, driver: str) -> None:
    url = database_url(given)

    assert url.drivername == driver
    assert (url.host, url.database) == (make_url(given).host, make_url(given).database)


def test_a_plain_postgresql_url_opens_with_psycopg(postgres_store_url: str) -> None:
    plain = postgres_store_url.replace("postgresql+psycopg://", "postgresql://")

    with Store.open(plain) as store:
        assert store.ping() is True
        assert store.list_agents() == []


def test_ping_answers_true_while_the_database_is_up(store: Store) -> None:
    assert store.ping() is True


def _unused_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_an_unreachable_postgresql_is_reported_as_unavailable() -> None:
    # Nothing listens there: what a verifier sees while its database restarts.
    url = f"postgresql://gpuattest@127.0.0.1:{_unused_loopback_port()}/gpuattest"

    with pytest.raises(StoreUnavailableError, match="postgresql"):
        Store.open(url)
    unreachable = Store(create_store_engine(url))
    try:
        assert unreachable.ping() is False
        with pytest.raises(StoreUnavailableError):
            unreachable.agent_state("agent-a")
    finally:
        unreachable.close()
