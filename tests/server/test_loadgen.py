"""The load generator: configuration, routing, agent behaviour, and whole runs.

The whole runs are real: one spawns a verifier process through the CLI on a SQLite file;
the other drives a verifier started in this process, enrolling with tokens and checking
storage through the Results service (no database access).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from gpuattest.cli import cli
from proto import verifier_pb2 as pb
from proto.transport import REASON_KEY, RETRY_AFTER_KEY
from server.loadgen import (
    ISSUE_KEYS,
    AgentDriver,
    AgentRun,
    LoadConfig,
    LoadgenError,
    Router,
    SimAgent,
    cpu_set,
    new_seed,
    run_against,
)
from server.serve import start_verifier
from server.settings import VerifierSettings
from server.store import Store

NS_PER_S = 1_000_000_000


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        pytest.param(LoadConfig(spawn=1), "needs --db", id="spawn-without-db"),
        pytest.param(LoadConfig(db_url="sqlite://"), "--verifier", id="nowhere-to-send"),
        pytest.param(
            LoadConfig(verifiers=("127.0.0.1:1",), agents=2, tokens=("one",)),
            "one enrolment token per agent",
            id="too-few-tokens",
        ),
        pytest.param(
            LoadConfig(verifiers=("127.0.0.1:1",), db_url="sqlite://", agents=0),
            "at least 1",
            id="no-agents",
        ),
        pytest.param(
            LoadConfig(verifiers=("127.0.0.1:1",), db_url="sqlite://", window_rate=0),
            "positive",
            id="no-rate",
        ),
    ],
)
def test_configurations_that_cannot_run_are_refused(config: LoadConfig, complaint: str) -> None:
    with pytest.raises(LoadgenError, match=complaint):
        config.validate()


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        pytest.param(None, frozenset(), id="none"),
        pytest.param("1", frozenset({1}), id="one"),
        pytest.param("0,1", frozenset({0, 1}), id="list"),
        pytest.param("0-2,5", frozenset({0, 1, 2, 5}), id="range"),
    ],
)
def test_cpu_lists_parse(text: str | None, cpus: frozenset[int]) -> None:
    assert cpu_set(text) == cpus


class ScriptedStub:
    """A stand-in verifier connection: refuses as scripted, then acknowledges."""

    def __init__(self, refusals: list[tuple[grpc.StatusCode, str, str]]) -> None:
        self.refusals = refusals
        self.batches: list[int] = []
        self.acked = 0

    async def Submit(
        self, request: pb.SubmitRequest, *, timeout: float | None = None
    ) -> pb.SubmitResponse:
        if self.refusals:
            code, reason, retry_after_ms = self.refusals.pop(0)
            trailers = grpc.aio.Metadata((REASON_KEY, reason), (RETRY_AFTER_KEY, retry_after_ms))
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, reason)
        self.batches.append(len(request.envelopes))
        self.acked += len(request.envelopes)
        return pb.SubmitResponse(acked_sequence=self.acked, accepted=len(request.envelopes))


def test_the_router_spreads_agents_and_moves_them_on() -> None:
    stubs = [[ScriptedStub([]) for _ in range(2)] for _ in range(3)]
    router = Router(stubs, switch_every_s=10.0)

    first = [router.stub(agent, 0.0) for agent in range(6)]
    later = [router.stub(agent, 100.0) for agent in range(6)]

    verifier_of = {id(stub): v for v, per in enumerate(stubs) for stub in per}
    before = [verifier_of[id(stub)] for stub in first]
    after = [verifier_of[id(stub)] for stub in later]
    assert sorted(before) == [0, 0, 1, 1, 2, 2]
    assert all(b != a for b, a in zip(before, after, strict=True))


async def test_an_agent_waits_out_an_overload_and_delivers_everything() -> None:
    stub = ScriptedStub(
        [
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", "60"),
            (grpc.StatusCode.UNAVAILABLE, "store_unavailable", "10"),
        ]
    )
    config = LoadConfig(duration_s=0.6, window_rate=20, batch=4)
    run = AgentRun(SimAgent(0, "agt-x", new_seed(), "host"), [b"e"] * 13)
    loop = asyncio.get_running_loop()

    await AgentDriver(run, config, Router([[stub]], 0.0), loop.time(), 0.0).drive()

    assert dict(run.refusals) == {"overloaded": 1, "store_unavailable": 1}
    assert run.acked == sum(stub.batches) >= 10
    assert max(stub.batches) <= config.batch
    assert run.resent >= 2  # at least the first envelope, refused twice and sent again
    assert run.rejected == 0


async def test_an_agent_stops_at_a_rejection_it_cannot_get_past() -> None:
    stub = ScriptedStub([(grpc.StatusCode.PERMISSION_DENIED, "key_revoked", "")])
    run = AgentRun(SimAgent(0, "agt-x", new_seed(), "host"), [b"e"] * 5)
    loop = asyncio.get_running_loop()

    await AgentDriver(run, LoadConfig(duration_s=5), Router([[stub]], 0.0), loop.time(), 0).drive()

    assert (run.rejected, run.stopped, run.acked) == (1, "key_revoked", 0)


def test_the_cli_spawns_a_verifier_and_reports_json(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'verifier.db'}"
    arguments = [
        "loadgen",
        "--spawn-verifier",
        "--db",
        db_url,
        "--agents",
        "4",
        "--gpus-per-agent",
        "2",
        "--duration",
        "1.5",
        "--window-rate",
        "4",
        "--sign-processes",
        "1",
        "--json",
    ]

    result = CliRunner().invoke(cli, arguments, catch_exceptions=False)

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(ISSUE_KEYS) <= set(report)
    assert report["stored_exactly_once"] is True
    assert report["rejected"] == 0
    assert report["acked"] == report["sent"] >= 4 * 6
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    with Store.open(db_url) as store:
        assert store.count_envelopes() == report["acked"]


async def test_a_run_without_database_access_checks_through_the_results_service(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'verifier.db'}"
    with Store.open(db_url) as store:
        settings = VerifierSettings(listen="127.0.0.1:0", db_url=db_url, insecure_plaintext=True)
        running = await start_verifier(settings, store)
        try:
            tokens = []
            for index in range(3):
                token = f"token-{index}-{time.time_ns()}"
                now = time.time_ns()
                digest = hashlib.sha256(token.encode()).digest()
                store.add_enrol_token(digest, "", now + 60 * NS_PER_S, now)
                tokens.append(token)
            config = LoadConfig(
                verifiers=(f"127.0.0.1:{running.port}",),
                agents=3,
                gpus_per_agent=1,
                duration_s=1.0,
                window_rate=5,
                tokens=tuple(tokens),
                sign_processes=1,
            )
            report = await run_against(config, config.verifiers)
        finally:
            await running.stop(0)
        assert report.stored_exactly_once
        assert report.storage_check.startswith("ListAgents")
        assert report.acked == store.count_envelopes() >= 3 * 5
