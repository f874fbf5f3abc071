"""The verifier's gRPC services: enrolment, challenge, evidence intake and results.

The services translate between gRPC and the appraisal core / store; every rejection is
answered with a precise status and counted by reason. Blocking work (signature checks,
database) runs on a worker thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import grpc
from prometheus_client import CollectorRegistry, Counter

from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.errors import MalformedError
from proto.signing import PublicKey
from server import appraisal
from server.appraisal import AppraisalError, AppraisalPolicy
from server.classify import Classifier
from server.records import AcceptedEnvelope, AgentState, KeyRecord, NonceRecord
from server.store import EnrolmentRefused, Store

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # wall-clock nanoseconds since the Unix epoch
ACKED_SEQUENCE_KEY = "gpuattest-acked-sequence"
REASON_KEY = "gpuattest-reason"
MAX_LIST_LIMIT = 10_000
MAX_HOSTNAME_BYTES = 253  # longest DNS name
NS_PER_S = 1_000_000_000


class IngestCounters:
    """Accepted, duplicate and rejected envelopes, exported to Prometheus and GetStats."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self.rejections: dict[tuple[str, str], int] = {}
        self.accepted = 0
        self.duplicates = 0
        self._rejected = Counter(
            "gpuattest_verifier_rejections",
            "Envelopes and requests rejected, by reason and gRPC status",
            ["reason", "code"],
            registry=registry,
        )
        self._accepted = Counter(
            "gpuattest_verifier_envelopes_accepted", "Envelopes newly stored", registry=registry
        )
        self._duplicates = Counter(
            "gpuattest_verifier_envelopes_duplicate",
            "Envelopes already stored, acknowledged again",
            registry=registry,
        )

    def reject(self, reason: str, code: str) -> None:
        """Count one rejection."""
        with self._lock:
            self.rejections[(reason, code)] = self.rejections.get((reason, code), 0) + 1
        self._rejected.labels(reason=reason, code=code).inc()

    def accept(self, accepted: int, duplicates: int) -> None:
        """Count stored and duplicate envelopes of one call."""
        with self._lock:
            self.accepted += accepted
            self.duplicates += duplicates
        self._accepted.inc(accepted)
        self._duplicates.inc(duplicates)


class _BatchContext:
    """AppraisalContext over the store plus what earlier envelopes of this batch changed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._keys: dict[str, KeyRecord | None] = {}
        self._states: dict[str, AgentState] = {}
        self._hashes: dict[tuple[str, int], bytes] = {}
        self._used_nonces: set[bytes] = set()

    def key(self, key_id: str) -> KeyRecord | None:
        if key_id not in self._keys:
            self._keys[key_id] = self._store.key(key_id)
        return self._keys[key_id]

    def agent_state(self, agent_id: str) -> AgentState | None:
        return self._states.get(agent_id) or self._store.agent_state(agent_id)

    def stored_sha256(self, agent_id: str, sequence: int) -> bytes | None:
        pending = self._hashes.get((agent_id, sequence))
        return pending or self._store.stored_envelope_sha256(agent_id, sequence)

    def nonce(self, nonce: bytes) -> NonceRecord | None:
        record = self._store.nonce(nonce)
        if record is not None and nonce in self._used_nonces:
            return replace(record, used=True)
        return record

    def accept(self, record: AcceptedEnvelope) -> None:
        self._states[record.agent_id] = AgentState(
            record.agent_id, record.sequence, record.chain_head_sha256
        )
        self._hashes[(record.agent_id, record.sequence)] = record.envelope_sha256
        if record.nonce:
            self._used_nonces.add(record.nonce)


@dataclass
class IngestOutcome:
    """What one Submit call did."""

    agent_id: str = ""
    accepted: list[AcceptedEnvelope] = field(default_factory=list)
    duplicates: int = 0
    rejection: AppraisalError | None = None
    acked_sequence: int | None = None


class Ingestor:
    """Appraise a batch in order and store what passed, in one transaction."""

    def __init__(
        self,
        store: Store,
        classifier: Classifier,
        policy: AppraisalPolicy,
        clock: Clock,
        counters: IngestCounters,
    ) -> None:
        self._store = store
        self._classifier = classifier
        self._policy = policy
        self._clock = clock
        self._counters = counters
        # One batch at a time: the chain check and the insert must not interleave for an
        # agent. (Per-agent locking is the fleet-scale issue's work.)
        self._lock = threading.Lock()

    def ingest(self, envelopes: list[bytes]) -> IngestOutcome:
        """Appraise ``envelopes`` in order; store the accepted prefix; count everything."""
        with self._lock:
            outcome = self._appraise_batch(envelopes)
            if outcome.accepted:
                # Commit before anything is acknowledged.
                self._store.store_accepted(outcome.accepted)
            if outcome.rejection and outcome.rejection.observed_gap:
                self._store.record_gap(outcome.rejection.observed_gap)
            if outcome.agent_id:
                state = self._store.agent_state(outcome.agent_id)
                outcome.acked_sequence = state.acked_sequence if state else None
        self._counters.accept(len(outcome.accepted), outcome.duplicates)
        if outcome.rejection:
            self._counters.reject(outcome.rejection.reason, outcome.rejection.code)
        return outcome

    def _appraise_batch(self, envelopes: list[bytes]) -> IngestOutcome:
        outcome = IngestOutcome()
        context = _BatchContext(self._store)
        now = self._clock()
        for envelope in envelopes:
            try:
                result = appraisal.appraise(envelope, context, self._classifier, self._policy, now)
            except AppraisalError as exc:
                outcome.rejection = exc
                outcome.agent_id = outcome.agent_id or exc.agent_id
                break
            outcome.agent_id = (
                result.record.agent_id
                if isinstance(result, appraisal.Accepted)
                else result.agent_id
            )
            if isinstance(result, appraisal.Accepted):
                context.accept(result.record)
                outcome.accepted.append(result.record)
            else:
                outcome.duplicates += 1
        return outcome


async def _reject(
    context: grpc.aio.ServicerContext[Any, Any],
    code: str,
    reason: str,
    detail: str,
    acked_sequence: int | None = None,
) -> NoReturn:
    metadata: list[tuple[str, str]] = [(REASON_KEY, reason)]
    if acked_sequence is not None:
        metadata.append((ACKED_SEQUENCE_KEY, str(acked_sequence)))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(grpc.StatusCode[code], f"{reason}: {detail}")


class EvidenceIntakeService(pb_grpc.EvidenceIntakeServicer):
    """Submit: appraise and store batches of envelopes."""

    def __init__(self, ingestor: Ingestor, policy: AppraisalPolicy, counters: IngestCounters):
        self._ingestor = ingestor
        self._policy = policy
        self._counters = counters

    async def Submit(
        self,
        request: pb.SubmitRequest,
        context: grpc.aio.ServicerContext[pb.SubmitRequest, pb.SubmitResponse],
    ) -> pb.SubmitResponse:
        """Appraise the batch in order; fail with the first rejection's status."""
        count = len(request.envelopes)
        if count == 0 or count > self._policy.limits.max_envelopes_per_batch:
            code = "INVALID_ARGUMENT" if count == 0 else "RESOURCE_EXHAUSTED"
            reason = "empty_batch" if count == 0 else "batch_too_large"
            self._counters.reject(reason, code)
            await _reject(context, code, reason, f"{count} envelopes")
        try:
            outcome = await asyncio.to_thread(self._ingestor.ingest, list(request.envelopes))
        except Exception:
            log.exception("storing evidence failed; nothing was acknowledged")
            self._counters.reject("store_unavailable", "UNAVAILABLE")
            await _reject(context, "UNAVAILABLE", "store_unavailable", "retry later")
        if outcome.rejection:
            rejection = outcome.rejection
            log.warning("rejected envelope: %s (%s)", rejection, rejection.code)
            await _reject(
                context, rejection.code, rejection.reason, rejection.detail, outcome.acked_sequence
            )
        return pb.SubmitResponse(
            agent_id=outcome.agent_id,
            acked_sequence=outcome.acked_sequence or 0,
            accepted=len(outcome.accepted),
            duplicates=outcome.duplicates,
        )


class EnrolmentService(pb_grpc.EnrolmentServicer):
    """Enroll: bind a public key to a new agent id and a host, with a one-time token."""

    def __init__(self, store: Store, clock: Clock, counters: IngestCounters) -> None:
        self._store = store
        self._clock = clock
        self._counters = counters

    async def Enroll(
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext[pb.EnrollRequest, pb.EnrollResponse],
    ) -> pb.EnrollResponse:
        """Consume the token and enrol the key, or refuse with PERMISSION_DENIED."""
        try:
            key = PublicKey(bytes(request.public_key))
        except MalformedError as exc:
            self._counters.reject("malformed_public_key", "INVALID_ARGUMENT")
            await _reject(context, "INVALID_ARGUMENT", "malformed_public_key", str(exc))
        hostname = request.hostname
        if not hostname or len(hostname.encode()) > MAX_HOSTNAME_BYTES:
            self._counters.reject("bad_hostname", "INVALID_ARGUMENT")
            await _reject(context, "INVALID_ARGUMENT", "bad_hostname", "1 to 253 bytes")
        agent_id = f"agt-{key.key_id[:16]}"
        token_hash = hashlib.sha256(request.token.encode()).digest()
        try:
            await asyncio.to_thread(
                self._store.enroll,
                token_hash,
                hostname,
                agent_id,
                key.raw,
                key.key_id,
                self._clock(),
            )
        except EnrolmentRefused as exc:
            code = (
                "FAILED_PRECONDITION"
                if exc.reason == "key_already_enrolled"
                else ("PERMISSION_DENIED")
            )
            self._counters.reject(f"enrol_{exc.reason}", code)
            await _reject(context, code, f"enrol_{exc.reason}", str(exc))
        log.info("enrolled agent %s on host %s with key %s", agent_id, hostname, key.key_id)
        return pb.EnrollResponse(agent_id=agent_id, key_id=key.key_id)


class ChallengeService(pb_grpc.ChallengeServicer):
    """GetChallenge: a fresh nonce for an enrolled agent, valid for a bounded time."""

    def __init__(
        self, store: Store, clock: Clock, nonce_ttl_ns: int, counters: IngestCounters
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl_ns = nonce_ttl_ns
        self._counters = counters

    async def GetChallenge(
        self,
        request: pb.ChallengeRequest,
        context: grpc.aio.ServicerContext[pb.ChallengeRequest, pb.ChallengeResponse],
    ) -> pb.ChallengeResponse:
        """Issue a 32-byte nonce bound to the agent."""
        state = await asyncio.to_thread(self._store.agent_state, request.agent_id)
        if state is None:
            self._counters.reject("unknown_agent", "UNAUTHENTICATED")
            await _reject(context, "UNAUTHENTICATED", "unknown_agent", request.agent_id[:64])
        record = NonceRecord(
            nonce=secrets.token_bytes(32),
            agent_id=request.agent_id,
            expires_unix_ns=self._clock() + self._ttl_ns,
            used=False,
        )
        await asyncio.to_thread(self._store.add_nonce, record)
        return pb.ChallengeResponse(nonce=record.nonce, expires_unix_ns=record.expires_unix_ns)


class ResultsService(pb_grpc.ResultsServicer):
    """Queries for relying parties: agents, GPU windows with verdicts, ingest counters."""

    def __init__(self, store: Store, counters: IngestCounters) -> None:
        self._store = store
        self._counters = counters

    async def ListAgents(
        self,
        request: pb.ListAgentsRequest,
        context: grpc.aio.ServicerContext[pb.ListAgentsRequest, pb.ListAgentsResponse],
    ) -> pb.ListAgentsResponse:
        """Every enrolled agent with its chain position and counts."""
        agents = await asyncio.to_thread(self._store.list_agents)
        return pb.ListAgentsResponse(
            agents=[
                pb.AgentSummary(
                    agent_id=a.agent_id,
                    hostname=a.hostname,
                    key_id=a.key_id,
                    revoked=a.revoked,
                    acked_sequence=a.acked_sequence,
                    windows_stored=a.windows_stored,
                    gaps=a.gaps,
                    last_seen_unix_ns=a.last_seen_unix_ns,
                )
                for a in agents
            ]
        )

    async def ListWindows(
        self,
        request: pb.ListWindowsRequest,
        context: grpc.aio.ServicerContext[pb.ListWindowsRequest, pb.ListWindowsResponse],
    ) -> pb.ListWindowsResponse:
        """Stored GPU windows with verdicts, oldest first."""
        limit = min(request.limit or 1000, MAX_LIST_LIMIT)
        rows = await asyncio.to_thread(
            self._store.list_windows, request.agent_id or None, request.since_unix_ns, limit
        )
        return pb.ListWindowsResponse(
            windows=[
                pb.WindowResult(
                    agent_id=r.agent_id,
                    sequence=r.sequence,
                    gpu_index=r.gpu_index,
                    gpu_uuid=r.gpu_uuid,
                    start_unix_ns=r.start_unix_ns,
                    end_unix_ns=r.end_unix_ns,
                    verdict=r.verdict,
                    confidence=r.confidence,
                    model_version=r.model_version,
                    source=r.source,
                )
                for r in rows
            ]
        )

    async def GetStats(
        self,
        request: pb.StatsRequest,
        context: grpc.aio.ServicerContext[pb.StatsRequest, pb.StatsResponse],
    ) -> pb.StatsResponse:
        """Ingest counters since this process started."""
        counters = self._counters
        return pb.StatsResponse(
            rejections=[
                pb.RejectionCount(reason=reason, code=code, count=count)
                for (reason, code), count in sorted(counters.rejections.items())
            ],
            envelopes_accepted=counters.accepted,
            duplicates=counters.duplicates,
        )
