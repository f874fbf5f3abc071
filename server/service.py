"""The verifier's gRPC services: enrolment, challenge, evidence intake and results.

The services translate between gRPC and the appraisal core / store; every rejection is
answered with a precise status and counted by reason. Evidence goes through the ingest
pipeline (:mod:`server.ingest`); other blocking work (database) runs on a worker thread so
the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc

from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.errors import MalformedError
from proto.signing import PublicKey
from proto.transport import ACKED_SEQUENCE_KEY, REASON_KEY, RETRY_AFTER_KEY
from server.appraisal import AppraisalPolicy
from server.ingest import IngestCounters, IngestPipeline, Overloaded, StoreUnavailable
from server.records import NonceRecord
from server.store import EnrolmentRefused, Store, StoreUnavailableError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

Clock = Callable[[], int]  # wall-clock nanoseconds since the Unix epoch
STORE_RETRY_MS = 1000
MAX_LIST_LIMIT = 10_000
MAX_HOSTNAME_BYTES = 253  # longest DNS name
NS_PER_S = 1_000_000_000


async def _reject(
    context: grpc.aio.ServicerContext[Any, Any],
    code: str,
    reason: str,
    detail: str,
    acked_sequence: int | None = None,
    retry_after_ms: int | None = None,
) -> NoReturn:
    metadata: list[tuple[str, str]] = [(REASON_KEY, reason)]
    if acked_sequence is not None:
        metadata.append((ACKED_SEQUENCE_KEY, str(acked_sequence)))
    if retry_after_ms is not None:
        metadata.append((RETRY_AFTER_KEY, str(retry_after_ms)))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(grpc.StatusCode[code], f"{reason}: {detail}")


async def _in_store(
    context: grpc.aio.ServicerContext[Any, Any],
    counters: IngestCounters,
    call: Callable[..., _T],
    *args: Any,
) -> _T:
    """Run a blocking store call on a worker thread; a database outage is UNAVAILABLE."""
    try:
        return await asyncio.to_thread(call, *args)
    except StoreUnavailableError:
        counters.reject("store_unavailable", "UNAVAILABLE")
        await _reject(
            context, "UNAVAILABLE", "store_unavailable", "retry later", None, STORE_RETRY_MS
        )


class EvidenceIntakeService(pb_grpc.EvidenceIntakeServicer):
    """Submit: appraise and store batches of envelopes (through the ingest pipeline)."""

    def __init__(
        self, pipeline: IngestPipeline, policy: AppraisalPolicy, counters: IngestCounters
    ) -> None:
        self._pipeline = pipeline
        self._policy = policy
        self._counters = counters

    async def Submit(
        self,
        request: pb.SubmitRequest,
        context: grpc.aio.ServicerContext[pb.SubmitRequest, pb.SubmitResponse],
    ) -> pb.SubmitResponse:
        """Appraise the batch in order; fail with the first rejection's status.

        Answered only after what was accepted is committed. A full queue is refused with
        RESOURCE_EXHAUSTED "overloaded" and a retry hint; a database failure with
        UNAVAILABLE "store_unavailable"; neither stored anything.
        """
        count = len(request.envelopes)
        if count == 0 or count > self._policy.limits.max_envelopes_per_batch:
            code = "INVALID_ARGUMENT" if count == 0 else "RESOURCE_EXHAUSTED"
            reason = "empty_batch" if count == 0 else "batch_too_large"
            self._counters.reject(reason, code)
            await _reject(context, code, reason, f"{count} envelopes")
        try:
            outcome = await self._pipeline.submit(list(request.envelopes))
        except Overloaded as exc:
            self._counters.reject("overloaded", "RESOURCE_EXHAUSTED")
            await _reject(
                context, "RESOURCE_EXHAUSTED", "overloaded", str(exc), None, exc.retry_after_ms
            )
        except StoreUnavailable:
            self._counters.reject("store_unavailable", "UNAVAILABLE")
            await _reject(
                context, "UNAVAILABLE", "store_unavailable", "retry later", None, STORE_RETRY_MS
            )
        if outcome.rejection:
            rejection = outcome.rejection
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
            await _in_store(
                context,
                self._counters,
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
        state = await _in_store(context, self._counters, self._store.agent_state, request.agent_id)
        if state is None:
            self._counters.reject("unknown_agent", "UNAUTHENTICATED")
            await _reject(context, "UNAUTHENTICATED", "unknown_agent", request.agent_id[:64])
        record = NonceRecord(
            nonce=secrets.token_bytes(32),
            agent_id=request.agent_id,
            expires_unix_ns=self._clock() + self._ttl_ns,
            used=False,
        )
        await _in_store(context, self._counters, self._store.add_nonce, record)
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
        agents = await _in_store(context, self._counters, self._store.list_agents)
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
        rows = await _in_store(
            context,
            self._counters,
            self._store.list_windows,
            request.agent_id or None,
            request.since_unix_ns,
            limit,
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
