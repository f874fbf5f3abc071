"""Every named forged, replayed or malformed submission, over real loopback gRPC.

Each case enrols a real agent, stores one good envelope, then submits the bad one and
checks the exact status, the counted reason, and that nothing more was stored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest

from agent.client import SubmitRejected
from proto import envelope as dsse
from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.envelope_pb2 import Envelope
from proto.evidence_pb2 import Evidence, Feature, GpuWindow
from proto.signing import Ed25519Signer
from tests.e2e.conftest import NS_PER_S, TEST_LIMITS, LiveVerifier


@dataclass
class Agent:
    """An enrolled agent that has had envelope 1 accepted."""

    agent_id: str
    signer: Ed25519Signer
    first: bytes  # the accepted envelope 1

    def evidence(self, sequence: int, previous: bytes | None = None, **changes: object) -> Evidence:
        end = time.time_ns() - 60 * NS_PER_S + sequence * 10 * NS_PER_S
        message = Evidence(
            agent_id=self.agent_id,
            key_id=self.signer.key_id,
            sequence=sequence,
            previous_envelope_sha256=dsse.envelope_sha256(self.first)
            if previous is None
            else previous,
            window_start_unix_ns=end - 10 * NS_PER_S,
            window_end_unix_ns=end,
            gpus=[
                GpuWindow(
                    gpu_index=0,
                    sample_count=100,
                    features=[
                        Feature(name="busy_frac", value=0.99),
                        Feature(name="idle_frac", value=0.0),
                    ],
                )
            ],
            source="test",
        )
        for name, value in changes.items():
            if isinstance(value, list):  # repeated fields are replaced, not assigned
                del getattr(message, name)[:]
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        return message

    def sign(self, message: Evidence, signer: Ed25519Signer | None = None) -> bytes:
        payload = message.SerializeToString(deterministic=True)
        return dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, payload, signer or self.signer)


async def _enrolled_agent(verifier: LiveVerifier) -> Agent:
    agent_id, signer = await verifier.enroll()
    agent = Agent(agent_id, signer, b"")
    agent.first = agent.sign(agent.evidence(1, dsse.GENESIS_HASH))
    response = await verifier.client.submit([agent.first])
    assert response.acked_sequence == 1
    return agent


def _relabel(envelope_bytes: bytes, payload_type: str) -> bytes:
    envelope = Envelope.FromString(envelope_bytes)
    envelope.payload_type = payload_type
    return envelope.SerializeToString()


def _strip(envelope_bytes: bytes) -> bytes:
    envelope = Envelope.FromString(envelope_bytes)
    del envelope.signatures[:]
    return envelope.SerializeToString()


def _flip_signature(envelope_bytes: bytes) -> bytes:
    envelope = Envelope.FromString(envelope_bytes)
    signature = bytearray(envelope.signatures[0].sig)
    signature[0] ^= 1
    envelope.signatures[0].sig = bytes(signature)
    return envelope.SerializeToString()


def _with_nan(agent: Agent) -> bytes:
    message = agent.evidence(2)
    message.gpus[0].features.append(Feature(name="power_mean_w", value=math.nan))
    return agent.sign(message)


def _signed_garbage_payload(agent: Agent) -> bytes:
    return dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, b"\xff\xff\xff", agent.signer)


def _oversized(agent: Agent) -> bytes:
    message = agent.evidence(2)
    message.host.hostname = "x" * (TEST_LIMITS.max_envelope_bytes + 1)
    return agent.sign(message)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Agent], list[bytes]]  # the batch to submit
    code: grpc.StatusCode
    reason: str


CASES = [
    Case(
        "bad signature",
        lambda a: [_flip_signature(a.sign(a.evidence(2)))],
        grpc.StatusCode.UNAUTHENTICATED,
        "bad_signature",
    ),
    Case(
        "unknown key",
        lambda a: [a.sign(a.evidence(2), Ed25519Signer.generate())],
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown_key",
    ),
    Case(
        "stripped signature",
        lambda a: [_strip(a.sign(a.evidence(2)))],
        grpc.StatusCode.UNAUTHENTICATED,
        "missing_signature",
    ),
    Case(
        "payload-type confusion: relabelled",
        lambda a: [_relabel(a.sign(a.evidence(2)), dsse.GAP_NOTICE_PAYLOAD_TYPE)],
        grpc.StatusCode.UNAUTHENTICATED,
        "bad_signature",
    ),
    Case(
        "payload-type confusion: signed foreign type",
        lambda a: [
            dsse.sign_envelope(
                "application/vnd.in-toto+json", a.evidence(2).SerializeToString(), a.signer
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload_type",
    ),
    Case(
        "reordered envelopes",
        lambda a: [a.sign(a.evidence(3))],
        grpc.StatusCode.FAILED_PRECONDITION,
        "sequence_gap",
    ),
    Case(
        "broken chain",
        lambda a: [a.sign(a.evidence(2, previous=bytes(32)))],
        grpc.StatusCode.FAILED_PRECONDITION,
        "chain_mismatch",
    ),
    Case(
        "equivocation: other content for a stored sequence",
        lambda a: [a.sign(a.evidence(1, dsse.GENESIS_HASH, source="forged"))],
        grpc.StatusCode.FAILED_PRECONDITION,
        "sequence_conflict",
    ),
    Case(
        "window from the future",
        lambda a: [
            a.sign(
                a.evidence(
                    2,
                    window_start_unix_ns=time.time_ns() + 300 * NS_PER_S,
                    window_end_unix_ns=time.time_ns() + 305 * NS_PER_S,
                )
            )
        ],
        grpc.StatusCode.FAILED_PRECONDITION,
        "window_in_future",
    ),
    Case(
        "unknown nonce",
        lambda a: [a.sign(a.evidence(2, nonce=b"\x01" * 32))],
        grpc.StatusCode.FAILED_PRECONDITION,
        "nonce_unknown",
    ),
    Case(
        "oversized envelope",
        lambda a: [_oversized(a)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "envelope_too_large",
    ),
    Case(
        "batch too large",
        lambda a: [a.first] * (TEST_LIMITS.max_envelopes_per_batch + 1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "batch_too_large",
    ),
    Case(
        "malformed protobuf envelope",
        lambda a: [b"\x0a\xff\xff\xff\xff"],
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed_envelope",
    ),
    Case(
        "malformed protobuf payload",
        lambda a: [_signed_garbage_payload(a)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed_payload",
    ),
    Case(
        "NaN features",
        lambda a: [_with_nan(a)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "non_finite_value",
    ),
    Case(
        "impossible value",
        lambda a: [
            a.sign(
                a.evidence(
                    2,
                    gpus=[
                        GpuWindow(
                            gpu_index=0, features=[Feature(name="util_gpu_mean_pct", value=3e6)]
                        )
                    ],
                )
            )
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "value_out_of_range",
    ),
    Case(
        "another agent's identity",
        lambda a: [a.sign(a.evidence(2, agent_id="agt-someone-else"))],
        grpc.StatusCode.PERMISSION_DENIED,
        "agent_key_mismatch",
    ),
    Case("empty batch", lambda a: [], grpc.StatusCode.INVALID_ARGUMENT, "empty_batch"),
]


async def _stats(verifier: LiveVerifier) -> dict[str, int]:
    stats = await pb_grpc.ResultsStub(verifier.channel).GetStats(pb.StatsRequest())
    return {f"{r.code}:{r.reason}": r.count for r in stats.rejections}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_rejected_with_precise_status_and_nothing_stored(
    live_verifier: LiveVerifier, case: Case
) -> None:
    agent = await _enrolled_agent(live_verifier)
    stored_before = live_verifier.store.count_envelopes()
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit(case.build(agent))
    assert (caught.value.code, caught.value.reason) == (case.code, case.reason)
    assert live_verifier.store.count_envelopes() == stored_before
    assert (await _stats(live_verifier)) == {f"{case.code.name}:{case.reason}": 1}


async def test_revoked_key_is_denied(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    assert live_verifier.store.revoke_key(agent.signer.key_id, time.time_ns())
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit([agent.sign(agent.evidence(2))])
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "key_revoked",
    )
    assert live_verifier.store.count_envelopes() == 1


async def test_expired_nonce_is_refused(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    challenge = await live_verifier.client.challenge(agent.agent_id)
    live_verifier.clock.offset_ns = challenge.expires_unix_ns - time.time_ns() + NS_PER_S
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit([agent.sign(agent.evidence(2, nonce=challenge.nonce))])
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "nonce_expired",
    )
    assert live_verifier.store.count_envelopes() == 1


async def test_fresh_nonce_is_accepted_once(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    challenge = await live_verifier.client.challenge(agent.agent_id)
    second = agent.sign(agent.evidence(2, nonce=challenge.nonce))
    assert (await live_verifier.client.submit([second])).acked_sequence == 2
    reuse = agent.sign(
        agent.evidence(3, previous=dsse.envelope_sha256(second), nonce=challenge.nonce)
    )
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit([reuse])
    assert caught.value.reason == "nonce_used"


async def test_replayed_envelope_is_acknowledged_idempotently(live_verifier: LiveVerifier) -> None:
    """A byte-identical resend (an honest retry or a replay) stores nothing new."""
    agent = await _enrolled_agent(live_verifier)
    response = await live_verifier.client.submit([agent.first])
    assert (response.acked_sequence, response.accepted, response.duplicates) == (1, 0, 1)
    assert live_verifier.store.count_envelopes() == 1
    assert (await _stats(live_verifier)) == {}


async def test_oversized_request_is_refused_by_transport(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    too_big = [b"\x00" * TEST_LIMITS.max_envelope_bytes] * TEST_LIMITS.max_envelopes_per_batch
    too_big.append(b"\x00" * 128 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await live_verifier.client.submit(too_big)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert live_verifier.store.count_envelopes() == 1
    assert agent.agent_id


async def test_rejection_keeps_the_accepted_prefix_of_a_batch(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    second = agent.sign(agent.evidence(2))
    bad = agent.sign(agent.evidence(3, previous=bytes(32)))
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit([second, bad])
    assert caught.value.reason == "chain_mismatch"
    assert caught.value.acked_sequence == 2
    assert live_verifier.store.envelope_bytes(agent.agent_id, 2) == second


async def test_out_of_order_gap_is_reported_until_filled(live_verifier: LiveVerifier) -> None:
    agent = await _enrolled_agent(live_verifier)
    second = agent.sign(agent.evidence(2))
    third = agent.sign(agent.evidence(3, previous=dsse.envelope_sha256(second)))
    with pytest.raises(SubmitRejected) as caught:
        await live_verifier.client.submit([third])
    assert caught.value.acked_sequence == 1
    assert [a.gaps for a in live_verifier.store.list_agents()] == [1]
    response = await live_verifier.client.submit([second, third])
    assert response.acked_sequence == 3
    assert [a.gaps for a in live_verifier.store.list_agents()] == [0]
