"""Assemble and run the verifier's gRPC server: services, health, reflection, TLS.

Health follows the database: NOT_SERVING while it cannot be reached (the ingest path
noticed a failure, or a periodic probe did), SERVING again once it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.limits import WireLimits
from proto.transport import TransportError, check_plaintext_allowed
from server.appraisal import NS_PER_S, AppraisalPolicy
from server.classify import Classifier, default_classifier
from server.ingest import IngestCounters, IngestOptions, IngestPipeline
from server.service import (
    ChallengeService,
    Clock,
    EnrolmentService,
    EvidenceIntakeService,
    ResultsService,
)
from server.settings import VerifierSettings
from server.store import Store

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Enrolment", "Challenge", "EvidenceIntake", "Results")
)


# Probe the database this often while all is well, so an idle verifier notices an outage.
STORE_PROBE_INTERVAL_S = 5.0
# While the database is down: first probe after this long, doubling up to the maximum.
STORE_RETRY_FIRST_S = 0.05
STORE_RETRY_MAX_S = 2.0
# Partitions are made days ahead, so hourly maintenance is plenty.
WINDOW_MAINTENANCE_S = 3600.0


class StoreWatch:
    """Health follows the database: NOT_SERVING while it is unreachable, SERVING after."""

    def __init__(self, store: Store, health_servicer: health.aio.HealthServicer) -> None:
        self._store = store
        self._health = health_servicer
        self._on_back: list[Callable[[], None]] = []
        self._down = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def when_back(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the database answers again after an outage."""
        self._on_back.append(callback)

    def store_down(self) -> None:
        """Someone saw the database fail: report NOT_SERVING until a probe succeeds."""
        self._down.set()

    def start(self) -> None:
        """Watch on the running event loop."""
        self._task = asyncio.create_task(self._watch(), name="store-watch")

    async def stop(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._down.wait(), STORE_PROBE_INTERVAL_S)
            if not self._down.is_set() and await asyncio.to_thread(self._store.ping):
                continue
            log.error("the database is unreachable; reporting NOT_SERVING until it answers")
            await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self._until_it_answers()
            self._down.clear()
            for callback in self._on_back:
                callback()
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)
            log.warning("the database answers again; serving")

    async def _until_it_answers(self) -> None:
        delay = STORE_RETRY_FIRST_S
        while not await asyncio.to_thread(self._store.ping):
            await asyncio.sleep(delay)
            delay = min(2 * delay, STORE_RETRY_MAX_S)

    async def _set_all(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)


@dataclass
class RunningVerifier:
    """A started server and what a caller may want to inspect or stop."""

    server: grpc.aio.Server
    port: int
    counters: IngestCounters
    health: health.aio.HealthServicer
    housekeeping: tuple[asyncio.Task[None], ...]
    pipeline: IngestPipeline
    store_watch: StoreWatch

    async def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, stop accepting calls, finish those under way, stop ingest."""
        for task in self.housekeeping:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.store_watch.stop()
        await self.pipeline.stop()


async def purge_expired_nonces(store: Store, clock: Clock, interval_s: float) -> None:
    """Delete expired challenge nonces now and then, so unanswered challenges do not pile up."""
    while True:
        try:
            removed = await asyncio.to_thread(store.purge_expired_nonces, clock())
            if removed:
                log.info("purged %d expired nonces", removed)
        except Exception:
            log.exception("purging expired nonces failed; will try again")
        await asyncio.sleep(interval_s)


async def maintain_windows(
    store: Store, clock: Clock, retention_days: int, interval_s: float
) -> None:
    """Create PostgreSQL's day partitions ahead and apply the retention, now and then."""
    while True:
        try:
            report = await asyncio.to_thread(
                store.maintain_windows, clock(), retention_days or None
            )
            log.info("window maintenance: %s", report)
        except Exception:
            log.exception("window maintenance failed; will try again")
        await asyncio.sleep(interval_s)


def server_credentials(settings: VerifierSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with a client CA) credentials; None for permitted plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        if not settings.insecure_plaintext:
            raise TransportError(
                "the verifier needs tls_cert and tls_key, or insecure_plaintext on loopback"
            )
        check_plaintext_allowed(settings.listen)
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def start_verifier(
    settings: VerifierSettings,
    store: Store,
    classifier: Classifier | None = None,
    clock: Clock = time.time_ns,
    registry: CollectorRegistry | None = None,
    limits: WireLimits | None = None,
) -> RunningVerifier:
    """Build the server from its parts and start listening on ``settings.listen``."""
    limits = limits or WireLimits()
    credentials = server_credentials(settings)
    policy = AppraisalPolicy(
        limits=limits, max_future_skew_ns=int(settings.max_future_skew_s * NS_PER_S)
    )
    counters = IngestCounters(registry or CollectorRegistry())
    health_servicer = health.aio.HealthServicer()
    store_watch = StoreWatch(store, health_servicer)
    pipeline = IngestPipeline(
        store,
        classifier or default_classifier(),
        policy,
        clock,
        counters,
        ingest_options(settings),
        on_store_down=store_watch.store_down,
    )
    store_watch.when_back(pipeline.store_is_back)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", limits.max_request_bytes),
        ]
    )
    pb_grpc.add_EnrolmentServicer_to_server(EnrolmentService(store, clock, counters), server)
    pb_grpc.add_ChallengeServicer_to_server(
        ChallengeService(store, clock, int(settings.nonce_ttl_s * NS_PER_S), counters), server
    )
    pb_grpc.add_EvidenceIntakeServicer_to_server(
        EvidenceIntakeService(pipeline, policy, counters), server
    )
    pb_grpc.add_ResultsServicer_to_server(ResultsService(store, counters), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    pipeline.start()
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("verifier listening on port %d (%s)", port, "TLS" if credentials else "plaintext")
    housekeeping = (
        asyncio.create_task(
            purge_expired_nonces(store, clock, settings.nonce_ttl_s), name="purge-nonces"
        ),
        asyncio.create_task(
            maintain_windows(store, clock, settings.retention_days, WINDOW_MAINTENANCE_S),
            name="maintain-windows",
        ),
    )
    store_watch.start()
    return RunningVerifier(
        server, port, counters, health_servicer, housekeeping, pipeline, store_watch
    )


def ingest_options(settings: VerifierSettings) -> IngestOptions:
    """The ingest pipeline's sizes from the settings."""
    return IngestOptions(
        max_pending_envelopes=settings.ingest_max_pending_envelopes,
        max_queue_delay_ms=settings.ingest_max_queue_delay_ms,
        max_group_envelopes=settings.ingest_max_group_envelopes,
    )


async def serve_forever(settings: VerifierSettings, store: Store) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    registry = CollectorRegistry()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1", registry=registry)
    running = await start_verifier(settings, store, registry=registry)
    print(f"verifier serving on port {running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await running.stop()
