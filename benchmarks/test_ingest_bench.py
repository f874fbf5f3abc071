"""The verifier's ingest path: in process (no network), and whole over loopback gRPC.

Each round, every simulated agent delivers its next signed 8-GPU host window at once, the
way a fleet's agents do after their windows close; a round's time is what the verifier
needs for that many envelopes. ``extra_info`` carries envelopes per second. SQLite always;
PostgreSQL when its server binaries are present (the throwaway server of tests/conftest).

    .venv/bin/pytest benchmarks/test_ingest_bench.py --benchmark-enable

``gpuattest loadgen`` measures the same path under sustained, paced load with latency
percentiles; docs/scaling.md has its figures and commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from pytest_benchmark.fixture import BenchmarkFixture

from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.signing import Ed25519Signer
from server.appraisal import AppraisalPolicy
from server.classify import default_classifier
from server.ingest import IngestCounters, IngestPipeline
from server.loadgen import SimAgent, new_seed, presign, spawned_verifiers
from server.store import Store
from tests.conftest import PostgresServer, postgres_server, postgres_url  # noqa: F401

AGENTS = 64
GPUS = 8
ROUNDS = 8
HOUR_NS = 3600 * 1_000_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bench.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def _enrolled_chains(db_url: str) -> list[list[bytes]]:
    """AGENTS agents enrolled in the database, each with ROUNDS signed envelopes."""
    agents = []
    now = time.time_ns()
    with Store.open(db_url) as store:
        for index in range(AGENTS):
            seed = new_seed()
            signer = Ed25519Signer.from_seed(seed)
            token = hashlib.sha256(seed).digest()
            store.add_enrol_token(token, "", now + HOUR_NS, now)
            agent_id = f"agt-{signer.key_id[:16]}"
            store.enroll(
                token, f"bench-{index}", agent_id, signer.public_key.raw, signer.key_id, now
            )
            agents.append(SimAgent(index, agent_id, seed, f"bench-{index}"))
    return presign(agents, ROUNDS, GPUS, processes=1)


class Rounds:
    """Hands out each agent's next envelope, one round at a time."""

    def __init__(self, chains: list[list[bytes]]) -> None:
        self._chains = chains
        self._next = 0

    def take(self) -> list[bytes]:
        round_ = [chain[self._next] for chain in self._chains]
        self._next += 1
        return round_


def _record(benchmark: BenchmarkFixture, device_info: dict[str, str], backend: str) -> None:
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update({"backend": backend, "agents": AGENTS, "gpus_per_envelope": GPUS})


def _rate(benchmark: BenchmarkFixture) -> None:
    stats = benchmark.stats
    if stats is not None:  # absent with --benchmark-disable
        benchmark.extra_info["envelopes_per_s"] = round(AGENTS / stats.stats.median, 1)


def test_ingest_in_process(
    benchmark: BenchmarkFixture, db_url: str, device_info: dict[str, str]
) -> None:
    """Appraise and commit a round of envelopes through the pipeline, no gRPC."""
    _record(benchmark, device_info, db_url.split(":")[0])
    rounds = Rounds(_enrolled_chains(db_url))
    loop = asyncio.new_event_loop()
    store = Store.open(db_url)
    counters = IngestCounters(CollectorRegistry())
    pipeline = IngestPipeline(
        store, default_classifier(), AppraisalPolicy(), time.time_ns, counters
    )
    loop.call_soon(pipeline.start)

    async def deliver(round_: list[bytes]) -> None:
        outcomes = await asyncio.gather(*(pipeline.submit([e]) for e in round_))
        assert all(o.rejection is None and len(o.accepted) == 1 for o in outcomes)

    try:
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            lambda: loop.run_until_complete(deliver(rounds.take())), rounds=ROUNDS, iterations=1
        )
    finally:
        loop.run_until_complete(pipeline.stop())
        loop.close()
        store.close()
    _rate(benchmark)


@pytest.fixture
def verifier_address(db_url: str) -> Iterator[str]:
    """A verifier process serving ``db_url`` on a free loopback port."""
    with spawned_verifiers(1, db_url) as verifiers:
        yield verifiers[0].address


def test_ingest_over_loopback_grpc(
    benchmark: BenchmarkFixture, db_url: str, verifier_address: str, device_info: dict[str, str]
) -> None:
    """A round of Submit calls, one per agent, to a verifier in another process."""
    _record(benchmark, device_info, db_url.split(":")[0])
    rounds = Rounds(_enrolled_chains(db_url))
    loop = asyncio.new_event_loop()

    async def connect() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(verifier_address)  # bound to the running loop

    channel = loop.run_until_complete(connect())
    stub = pb_grpc.EvidenceIntakeStub(channel)

    async def deliver(round_: list[bytes]) -> None:
        responses = await asyncio.gather(
            *(stub.Submit(pb.SubmitRequest(envelopes=[e]), timeout=30) for e in round_)
        )
        assert all(response.accepted == 1 for response in responses)

    try:
        benchmark.pedantic(  # type: ignore[no-untyped-call]
            lambda: loop.run_until_complete(deliver(rounds.take())), rounds=ROUNDS, iterations=1
        )
    finally:
        loop.run_until_complete(channel.close())
        loop.close()
    _rate(benchmark)
