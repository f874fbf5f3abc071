"""The agent's side of the wire: channel security, enrolment, challenges, submission."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from agent.config import AgentConfig
from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.errors import GpuattestError
from proto.limits import WireLimits
from proto.transport import (
    ACKED_SEQUENCE_KEY,
    REASON_KEY,
    RETRY_AFTER_KEY,
    TransportError,
    check_plaintext_allowed,
)


def open_channel(settings: AgentConfig, limits: WireLimits | None = None) -> grpc.aio.Channel:
    """A channel to the verifier: TLS (mutual when a client cert is set), or loopback plaintext."""
    limits = limits or WireLimits()
    options = [
        ("grpc.max_send_message_length", limits.max_request_bytes),
        ("grpc.max_receive_message_length", limits.max_request_bytes),
    ]
    if settings.tls_ca is None:
        if not settings.insecure_plaintext:
            raise TransportError(
                "the agent needs tls_ca, or insecure_plaintext to a loopback verifier"
            )
        check_plaintext_allowed(settings.verifier)
        return grpc.aio.insecure_channel(settings.verifier, options=options)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise TransportError("mutual TLS needs both tls_cert and tls_key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca.read_bytes(),
        private_key=settings.tls_key.read_bytes() if settings.tls_key else None,
        certificate_chain=settings.tls_cert.read_bytes() if settings.tls_cert else None,
    )
    return grpc.aio.secure_channel(settings.verifier, credentials, options=options)


@dataclass(frozen=True)
class SubmitRejected(GpuattestError):  # noqa: N818 - a verdict, named like the others' reasons
    """The verifier refused an envelope; ``acked_sequence`` is its acknowledgement anyway."""

    code: grpc.StatusCode
    reason: str
    detail: str
    acked_sequence: int | None
    retry_after_ms: int | None = None

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.detail}"


def rejection_from(error: grpc.aio.AioRpcError) -> SubmitRejected:
    """Read the reason and acknowledgement the verifier put in the trailing metadata."""
    trailing = dict(error.trailing_metadata() or ())
    return SubmitRejected(
        code=error.code(),
        reason=str(trailing.get(REASON_KEY, "")),
        detail=error.details() or "",
        acked_sequence=_decimal(trailing.get(ACKED_SEQUENCE_KEY)),
        retry_after_ms=_decimal(trailing.get(RETRY_AFTER_KEY)),
    )


def _decimal(value: object) -> int | None:
    # A trailer is the peer's word: ASCII digits only ("²".isdigit() is true, and int()
    # refuses it) and no longer than a uint64, so int() cannot raise on what it is given.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value) if len(value) <= MAX_TRAILER_DIGITS else None
    return None


class VerifierClient:
    """Typed calls to the verifier's services over one channel."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0) -> None:
        self._enrolment = pb_grpc.EnrolmentStub(channel)
        self._challenge = pb_grpc.ChallengeStub(channel)
        self._intake = pb_grpc.EvidenceIntakeStub(channel)
        self._results = pb_grpc.ResultsStub(channel)
        self._timeout_s = timeout_s

    async def enroll(self, token: str, public_key: bytes, hostname: str) -> pb.EnrollResponse:
        """Present a one-time token and the agent's public key."""
        request = pb.EnrollRequest(token=token, public_key=public_key, hostname=hostname)
        return await self._enrolment.Enroll(request, timeout=self._timeout_s)

    async def challenge(self, agent_id: str) -> pb.ChallengeResponse:
        """Ask for a fresh nonce to bind into the next evidence."""
        request = pb.ChallengeRequest(agent_id=agent_id)
        return await self._challenge.GetChallenge(request, timeout=self._timeout_s)

    async def submit(self, envelopes: list[bytes]) -> pb.SubmitResponse:
        """Send a batch in sequence order; raises SubmitRejected on a verifier rejection."""
        try:
            return await self._intake.Submit(
                pb.SubmitRequest(envelopes=envelopes), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            rejection = rejection_from(error)
            # A reason in the trailers is the verifier's verdict on the content; without
            # one the call failed in transport and is worth retrying when transient.
            if rejection.reason and rejection.reason not in TRANSIENT_REASONS:
                raise rejection from error
            if error.code() in TRANSIENT_CODES:
                raise
            raise rejection from error

    async def list_windows(self, agent_id: str = "", limit: int = 0) -> pb.ListWindowsResponse:
        """Stored GPU windows and their verdicts."""
        request = pb.ListWindowsRequest(agent_id=agent_id, limit=limit)
        return await self._results.ListWindows(request, timeout=self._timeout_s)


# Digits of the largest uint64, the widest number a trailer carries (a sequence).
MAX_TRAILER_DIGITS = 20
# Verifier reasons that say "not now" rather than "not this".
TRANSIENT_REASONS = frozenset({"store_unavailable", "overloaded"})
# Worth retrying as they are: the verifier or the network is briefly unable to answer.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
