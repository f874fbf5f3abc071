"""Verifier processes on one PostgreSQL, over real loopback gRPC.

* Two verifier processes share one database; agents are spread across them and move to
  the other one every second; every window is stored once, and each was newly stored by
  exactly one of them.
* PostgreSQL crashes (``pg_ctl stop -m immediate``) and comes back while agents are
  sending: the verifier reports NOT_SERVING meanwhile, SERVING after, and no window it
  acknowledged is missing.

Both skip when PostgreSQL's server binaries are absent (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from server.loadgen import LoadConfig, LoadReport, run_against, spawned_verifiers
from server.store import Store
from tests.conftest import PostgresServer

HEALTH_TIMEOUT_S = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _accepted_by(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stats = await pb_grpc.ResultsStub(channel).GetStats(pb.StatsRequest())
    return stats.envelopes_accepted


async def _wait_for_health(address: str, wanted: int) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            if response.status == wanted:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"verifier health never became {wanted}")


def test_two_replicas_store_every_window_once_while_agents_move_between_them(
    postgres_url: str,
) -> None:
    config = LoadConfig(
        spawn=2,
        db_url=postgres_url,
        agents=12,
        gpus_per_agent=2,
        duration_s=3.0,
        window_rate=5.0,
        switch_every_s=1.0,
        channels=2,
        sign_processes=1,
    )
    with spawned_verifiers(2, postgres_url) as verifiers:
        addresses = [verifier.address for verifier in verifiers]

        async def run() -> tuple[LoadReport, list[int]]:
            report = await run_against(config, addresses)
            return report, [await _accepted_by(address) for address in addresses]

        report, accepted = asyncio.run(run())

    assert report.stored_exactly_once, report.storage_check
    assert report.rejected == 0
    assert report.acked == report.sent >= 12 * 15
    assert all(count > 0 for count in accepted)  # both replicas took a share
    with Store.open(postgres_url) as store:
        # No envelope was newly stored by both replicas.
        assert sum(accepted) == store.count_envelopes() == report.acked


def test_a_database_crash_while_agents_send_loses_no_acknowledged_window(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    config = LoadConfig(
        spawn=1,
        db_url=postgres_url,
        agents=8,
        gpus_per_agent=2,
        duration_s=4.0,
        window_rate=5.0,
        channels=2,
        sign_processes=1,
    )
    with spawned_verifiers(1, postgres_url) as verifiers:
        address = verifiers[0].address

        async def crash_and_recover() -> None:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(postgres_server.stop, "immediate")
            await _wait_for_health(address, NOT_SERVING)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(postgres_server.start)
            await _wait_for_health(address, SERVING)

        report = asyncio.run(run_against(config, [address], crash_and_recover))

    assert report.stored_exactly_once, report.storage_check
    assert report.rejected == 0
    assert report.refusals.get("store_unavailable", 0) > 0  # the outage was felt
    assert report.acked == report.sent  # and everything sealed was delivered after it
