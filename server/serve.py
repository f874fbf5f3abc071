"""Assemble and run the verifier's gRPC server: services, health, reflection, TLS."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
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
from server.classify import Classifier, ProvisionalRule
from server.service import (
    ChallengeService,
    Clock,
    EnrolmentService,
    EvidenceIntakeService,
    IngestCounters,
    Ingestor,
    ResultsService,
)
from server.settings import VerifierSettings
from server.store import Store

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Enrolment", "Challenge", "EvidenceIntake", "Results")
)


@dataclass
class RunningVerifier:
    """A started server and what a caller may want to inspect or stop."""

    server: grpc.aio.Server
    port: int
    counters: IngestCounters
    health: health.aio.HealthServicer
    housekeeping: asyncio.Task[None]

    async def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, then stop accepting calls and finish those under way."""
        self.housekeeping.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


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
    ingestor = Ingestor(store, classifier or ProvisionalRule(), policy, clock, counters)
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
        EvidenceIntakeService(ingestor, policy, counters), server
    )
    pb_grpc.add_ResultsServicer_to_server(ResultsService(store, counters), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("verifier listening on port %d (%s)", port, "TLS" if credentials else "plaintext")
    housekeeping = asyncio.create_task(
        purge_expired_nonces(store, clock, settings.nonce_ttl_s), name="purge-nonces"
    )
    return RunningVerifier(server, port, counters, health_servicer, housekeeping)


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
