"""The ingest pipeline, in process: group commits, ordering, backpressure, outages.

Real SQLite stores in tmp_path, real keys, real signed and chained envelopes; the only
stand-ins are stores that block or fail on purpose, to hold a commit open or to play an
unreachable database.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from proto.limits import WireLimits
from proto.signing import Ed25519Signer
from server.appraisal import AppraisalPolicy
from server.classify import ProvisionalRule
from server.ingest import (
    IngestCounters,
    IngestOptions,
    IngestOutcome,
    IngestPipeline,
    Overloaded,
    StoreUnavailable,
    signing_key_ids,
)
from server.loadgen import SimAgent, gpu_windows, new_seed, sign_chain
from server.records import AcceptedEnvelope, AgentState, KeyRecord
from server.store import Store, StoreError, StoreUnavailableError

NS_PER_S = 1_000_000_000
HOUR_NS = 3600 * NS_PER_S
GPUS = gpu_windows(2)


def _counting_store(url: str) -> CountingStore:
    store = CountingStore.open(url)
    assert isinstance(store, CountingStore)
    return store


class CountingStore(Store):
    """A real store that counts commits, and can hold them open or fail them on demand."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.commits = 0
        self.snapshots = 0
        self.gate = threading.Event()
        self.gate.set()
        self.unreachable = False
        self.clash_agents: set[str] = set()

    def store_accepted(self, accepted: Sequence[AcceptedEnvelope]) -> int:
        self.gate.wait(10)
        if self.unreachable:
            raise StoreUnavailableError("database unreachable (test)")
        if any(record.agent_id in self.clash_agents for record in accepted):
            raise StoreError("rows conflict (test)")
        self.commits += 1
        return super().store_accepted(accepted)

    def keys_with_chain_states(
        self, key_ids: Collection[str]
    ) -> dict[str, tuple[KeyRecord, AgentState]]:
        self.snapshots += 1
        return super().keys_with_chain_states(key_ids)

    def ping(self) -> bool:
        return not self.unreachable


def _enrol(store: Store, index: int, seed: bytes | None = None) -> SimAgent:
    seed = seed or new_seed()
    signer = Ed25519Signer.from_seed(seed)
    token = hashlib.sha256(seed + b"token").digest()
    now = time.time_ns()
    hostname = f"host-{index}"
    store.add_enrol_token(token, hostname, now + HOUR_NS, now)
    agent_id = f"agt-{signer.key_id[:16]}"
    store.enroll(token, hostname, agent_id, signer.public_key.raw, signer.key_id, now)
    return SimAgent(index, agent_id, seed, hostname)


def _chain(agent: SimAgent, count: int) -> list[bytes]:
    return sign_chain(agent, count, GPUS, time.time_ns())


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return _counting_store(f"sqlite:///{tmp_path / 'ingest.db'}")


class Harness:
    """A started pipeline over ``store``, and what it reported."""

    def __init__(self, store: CountingStore, options: IngestOptions) -> None:
        self.store = store
        self.counters = IngestCounters(CollectorRegistry())
        self.store_down_calls = 0
        self.pipeline = IngestPipeline(
            store,
            ProvisionalRule(),
            AppraisalPolicy(),
            time.time_ns,
            self.counters,
            options,
            on_store_down=self._store_down,
        )

    def _store_down(self) -> None:
        self.store_down_calls += 1


@pytest.fixture
async def harness(store: CountingStore) -> AsyncIterator[Harness]:
    running = Harness(store, IngestOptions(max_pending_envelopes=64, max_group_envelopes=32))
    running.pipeline.start()
    yield running
    store.gate.set()
    await running.pipeline.stop()
    store.close()


async def _submit_all(
    pipeline: IngestPipeline, calls: Sequence[list[bytes]]
) -> list[IngestOutcome]:
    return list(await asyncio.gather(*(pipeline.submit(call) for call in calls)))


def _stored_sequences(store: Store, agent: SimAgent) -> list[int]:
    rows = store.list_windows(agent.agent_id, 0, 10_000)
    return sorted({row.sequence for row in rows})


async def test_concurrent_calls_of_many_agents_share_one_commit(harness: Harness) -> None:
    agents = [_enrol(harness.store, i) for i in range(12)]
    chains = {agent.agent_id: _chain(agent, 2) for agent in agents}

    outcomes = await _submit_all(harness.pipeline, list(chains.values()))

    assert [o.rejection for o in outcomes] == [None] * len(agents)
    assert [o.acked_sequence for o in outcomes] == [2] * len(agents)
    assert {o.agent_id for o in outcomes} == set(chains)
    assert harness.store.commits == 1  # all twelve calls were queued before the first group
    assert harness.counters.accepted == 24
    for agent in agents:
        assert _stored_sequences(harness.store, agent) == [1, 2]


async def test_a_call_is_answered_only_after_its_commit(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    harness.store.gate.clear()  # the commit waits

    call = asyncio.create_task(harness.pipeline.submit(_chain(agent, 1)))
    await asyncio.sleep(0.2)
    assert not call.done()
    assert harness.store.count_envelopes() == 0

    harness.store.gate.set()
    outcome = await asyncio.wait_for(call, 10)
    assert outcome.acked_sequence == 1
    assert harness.store.count_envelopes() == 1


async def test_calls_of_one_agent_are_appraised_in_arrival_order(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    first, second, third = ([e] for e in _chain(agent, 3))

    outcomes = await _submit_all(harness.pipeline, [first, second, third])

    # Appraised against a stale chain state, the later calls would be sequence gaps.
    assert [o.acked_sequence for o in outcomes] == [1, 2, 3]
    assert [o.rejection for o in outcomes] == [None, None, None]
    assert harness.store.commits == 3


async def test_a_call_ahead_of_its_chain_is_rejected_as_a_gap(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    chain = _chain(agent, 2)

    ahead, behind = await _submit_all(harness.pipeline, [[chain[1]], [chain[0]]])

    assert ahead.rejection is not None
    assert (ahead.rejection.reason, ahead.acked_sequence) == ("sequence_gap", 0)
    assert (behind.rejection, behind.acked_sequence) == (None, 1)
    assert harness.counters.rejections == {("sequence_gap", "FAILED_PRECONDITION"): 1}


async def test_an_observed_gap_is_recorded_with_the_rejection(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    chain = _chain(agent, 3)

    outcome = await harness.pipeline.submit(chain[2:])

    assert outcome.rejection is not None
    assert outcome.rejection.reason == "sequence_gap"
    assert [a.gaps for a in harness.store.list_agents()] == [1]  # 1..2 missing, on record


def _rotate_key(store: Store, agent: SimAgent) -> SimAgent:
    """Enrol a second key for ``agent``: the same agent, signing with the new key."""
    seed = new_seed()
    rotated = Ed25519Signer.from_seed(seed)
    token = hashlib.sha256(seed).digest()
    now = time.time_ns()
    store.add_enrol_token(token, agent.hostname, now + HOUR_NS, now)
    store.enroll(token, agent.hostname, agent.agent_id, rotated.public_key.raw, rotated.key_id, now)
    return SimAgent(agent.index, agent.agent_id, seed, agent.hostname)


async def test_a_rotated_key_waits_for_the_agents_other_call(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    old_key_chain = _chain(agent, 1)
    new_key_chain = _chain(_rotate_key(harness.store, agent), 2)

    # Sequence 1 signed by the old key, then 1 and 2 signed by the new key (a conflict at 1).
    outcomes = await _submit_all(harness.pipeline, [old_key_chain, new_key_chain])

    assert outcomes[0].acked_sequence == 1
    assert outcomes[1].rejection is not None
    assert outcomes[1].rejection.reason == "sequence_conflict"


async def test_a_rotated_key_waits_while_the_other_keys_call_commits(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    old_key_chain = _chain(agent, 1)
    rotated = _rotate_key(harness.store, agent)
    harness.store.gate.clear()
    first = asyncio.create_task(harness.pipeline.submit(old_key_chain))
    await asyncio.sleep(0.1)  # its commit is held open

    second = asyncio.create_task(harness.pipeline.submit(_chain(rotated, 1)))
    await asyncio.sleep(0.2)
    snapshots_while_held = harness.store.snapshots
    harness.store.gate.set()

    assert (await first).acked_sequence == 1
    assert (await second).rejection is not None  # appraised after the first committed
    # One snapshot for the first call, one that found the agent busy: no spinning after.
    assert snapshots_while_held == 2


async def test_a_full_queue_refuses_with_a_retry_hint(store: CountingStore) -> None:
    options = IngestOptions(max_pending_envelopes=4, max_group_envelopes=2, retry_after_min_ms=70)
    harness = Harness(store, options)
    harness.pipeline.start()
    agents = [_enrol(store, i) for i in range(3)]
    store.gate.clear()
    try:
        held = [asyncio.create_task(harness.pipeline.submit(_chain(a, 2))) for a in agents[:2]]
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded) as refused:
            await harness.pipeline.submit(_chain(agents[2], 1))
        assert options.retry_after_min_ms <= refused.value.retry_after_ms <= 5000
        assert harness.pipeline.pending_envelopes == 4
    finally:
        store.gate.set()
        outcomes = await asyncio.gather(*held)
        await harness.pipeline.stop()
    assert [o.acked_sequence for o in outcomes] == [2, 2]
    assert harness.pipeline.pending_envelopes == 0


async def test_a_caller_that_gives_up_while_queued_is_dropped(harness: Harness) -> None:
    agent = _enrol(harness.store, 0)
    chain = _chain(agent, 2)
    harness.store.gate.clear()
    first = asyncio.create_task(harness.pipeline.submit(chain[:1]))
    await asyncio.sleep(0.1)  # its commit is held open
    queued = asyncio.create_task(harness.pipeline.submit(chain[1:]))  # waits for the first
    await asyncio.sleep(0.1)
    queued.cancel()

    harness.store.gate.set()
    assert (await first).acked_sequence == 1
    await asyncio.sleep(0.1)
    assert harness.store.count_envelopes() == 1  # the cancelled call never went in
    assert harness.pipeline.pending_envelopes == 0
    assert (await harness.pipeline.submit(chain[1:])).acked_sequence == 2


async def test_an_unreachable_database_acknowledges_nothing_until_it_is_back(
    harness: Harness,
) -> None:
    agent = _enrol(harness.store, 0)
    chain = _chain(agent, 2)
    harness.store.unreachable = True

    with pytest.raises(StoreUnavailable):
        await harness.pipeline.submit(chain[:1])
    assert harness.store_down_calls == 1
    with pytest.raises(StoreUnavailable):  # refused at once while down
        await harness.pipeline.submit(chain[:1])
    assert harness.store.count_envelopes() == 0

    harness.store.unreachable = False
    harness.pipeline.store_is_back()
    outcome = await harness.pipeline.submit(chain)
    assert (outcome.acked_sequence, len(outcome.accepted)) == (2, 2)


async def test_rows_that_clash_fail_only_their_own_call(harness: Harness) -> None:
    good, bad = (_enrol(harness.store, i) for i in range(2))
    harness.store.clash_agents.add(bad.agent_id)

    results = await asyncio.gather(
        harness.pipeline.submit(_chain(good, 1)),
        harness.pipeline.submit(_chain(bad, 1)),
        return_exceptions=True,
    )

    assert isinstance(results[0], IngestOutcome)
    assert results[0].acked_sequence == 1
    assert isinstance(results[1], StoreUnavailable)
    assert harness.store_down_calls == 0  # the database is fine; the rows were not
    assert _stored_sequences(harness.store, good) == [1]
    assert _stored_sequences(harness.store, bad) == []


async def test_stopping_answers_queued_calls_as_unavailable(store: CountingStore) -> None:
    harness = Harness(store, IngestOptions())
    harness.pipeline.start()
    agent = _enrol(store, 0)
    store.gate.clear()
    call = asyncio.create_task(harness.pipeline.submit(_chain(agent, 1)))
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(harness.pipeline.stop())
    await asyncio.sleep(0.1)
    store.gate.set()
    await stopping
    with pytest.raises(StoreUnavailable):
        await call


@pytest.mark.parametrize(
    ("envelopes", "expected"),
    [
        pytest.param([b"\xff\xff\xff"], frozenset(), id="not-protobuf"),
        pytest.param([b"x" * (WireLimits().max_envelope_bytes + 1)], frozenset(), id="too-large"),
        pytest.param([b""], frozenset(), id="empty"),
    ],
)
def test_unparseable_envelopes_name_no_key(
    envelopes: list[bytes], expected: frozenset[str]
) -> None:
    assert signing_key_ids(envelopes, WireLimits()) == expected


def test_signed_envelopes_name_their_key() -> None:
    agent = SimAgent(0, "agt-x", new_seed(), "host")
    key_id = Ed25519Signer.from_seed(agent.seed).key_id
    assert signing_key_ids(_chain(agent, 2), WireLimits()) == {key_id}


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    splits=st.lists(
        st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=4),
        min_size=1,
        max_size=4,
    ),
    group_size=st.integers(min_value=1, max_value=8),
)
def test_any_batching_of_concurrent_agents_stores_every_window_once(
    tmp_path_factory: pytest.TempPathFactory, splits: list[list[int]], group_size: int
) -> None:
    """Each agent's chain cut into calls of any sizes, all agents at once, any group size."""
    url = f"sqlite:///{tmp_path_factory.mktemp('prop') / 'ingest.db'}"
    store = _counting_store(url)
    agents = [_enrol(store, i) for i in range(len(splits))]
    calls_by_agent = []
    for agent, sizes in zip(agents, splits, strict=True):
        chain = _chain(agent, sum(sizes))
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        calls_by_agent.append([chain[a:b] for a, b in itertools.pairwise(bounds)])

    async def run() -> list[list[IngestOutcome]]:
        harness = Harness(store, IngestOptions(max_group_envelopes=group_size))
        harness.pipeline.start()

        async def agent_calls(calls: list[list[bytes]]) -> list[IngestOutcome]:
            # All of an agent's calls in flight at once: the pipeline must keep their order.
            return await _submit_all(harness.pipeline, calls)

        try:
            return list(await asyncio.gather(*(agent_calls(c) for c in calls_by_agent)))
        finally:
            await harness.pipeline.stop()

    try:
        results = asyncio.run(run())
        for agent, sizes, outcomes in zip(agents, splits, results, strict=True):
            assert [o.rejection for o in outcomes] == [None] * len(sizes)
            assert outcomes[-1].acked_sequence == sum(sizes)
            assert _stored_sequences(store, agent) == list(range(1, sum(sizes) + 1))
    finally:
        store.close()
