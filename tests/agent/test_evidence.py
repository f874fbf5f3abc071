"""Evidence payloads and their signed envelopes, built from synthetic window claims."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from fractions import Fraction
from random import Random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.evidence import (
    NS_PER_S,
    GpuFeatures,
    WindowClaims,
    build_evidence,
    host_facts,
    sign_evidence,
    sign_gap_notice,
)
from agent.samples import GpuDescription, HostDescription, MigDescription
from proto.envelope import (
    EVIDENCE_PAYLOAD_TYPE,
    GAP_NOTICE_PAYLOAD_TYPE,
    GENESIS_HASH,
    parse_envelope,
    verify,
)
from proto.envelope_pb2 import Envelope
from proto.errors import PayloadTypeError, SignatureError, UnknownKeyError
from proto.evidence_pb2 import Evidence, GapNotice, ProbeResult, ProcessAttribution
from proto.signing import Ed25519Signer, PublicKey

SIGNER = Ed25519Signer.from_seed(bytes(range(32)))
OTHER_SIGNER = Ed25519Signer.from_seed(bytes(range(1, 33)))
T0 = 1_700_000_000.0
PREVIOUS = hashlib.sha256(b"synthetic previous envelope").digest()

HOST = HostDescription(
    hostname="host-a",
    driver_version="550.54.15",
    nvml_version="12.550.54.15",
    gpus=(
        GpuDescription(
            index=0,
            uuid="GPU-synthetic-0000",
            name="NVIDIA A100-SXM4-80GB",
            memory_total_mib=81920,
            power_limit_w=400.0,
            gpm_supported=False,
            mig_instances=(
                MigDescription(1, 0, "MIG-synthetic-0001", "3g.40gb"),
                MigDescription(2, 0, "MIG-synthetic-0002", "3g.40gb"),
            ),
        ),
        GpuDescription(
            index=1,
            uuid="GPU-synthetic-0001",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=81559,
            power_limit_w=700.0,
            gpm_supported=True,
        ),
    ),
)


def claims(
    *,
    start_unix_s: float = T0,
    end_unix_s: float = T0 + 10.0,
    gpus: tuple[GpuFeatures, ...] = (),
    raw_samples: bytes = b"t_s,gpu\n",
    nonce: bytes = b"",
) -> WindowClaims:
    return WindowClaims(
        start_unix_s=start_unix_s,
        end_unix_s=end_unix_s,
        host=HOST,
        gpus=gpus,
        raw_samples=raw_samples,
        source="synthetic-replay",
        processes=(ProcessAttribution(gpu_index=0, pid=4242, job_kind="slurm_job", job_id="77"),),
        probes=(ProbeResult(gpu_index=1, kind="gemm", device="cpu", achieved_rate=1.5),),
        nonce=nonce,
    )


def build(window: WindowClaims, sequence: int = 7) -> Evidence:
    return build_evidence(
        window,
        agent_id="agent-1",
        key_id=SIGNER.key_id,
        sequence=sequence,
        previous_sha256=PREVIOUS,
        created_unix_ns=1_700_000_123_456_789_012,
    )


def trust(*keys: PublicKey) -> Callable[[str], PublicKey | None]:
    known = {key.key_id: key for key in keys}
    return known.get


# ---- build_evidence ------------------------------------------------------------------


def test_build_evidence_numbers_chains_and_carries_the_claims() -> None:
    raw = b"t_s,gpu,power_w\n1700000000.0,0,300.0\n"
    evidence = build(claims(raw_samples=raw, nonce=b"nonce-from-verifier"), sequence=7)

    assert (evidence.agent_id, evidence.key_id, evidence.sequence) == (
        "agent-1",
        SIGNER.key_id,
        7,
    )
    assert evidence.previous_envelope_sha256 == PREVIOUS
    assert evidence.created_unix_ns == 1_700_000_123_456_789_012
    assert evidence.raw_samples_sha256 == hashlib.sha256(raw).digest()
    assert evidence.nonce == b"nonce-from-verifier"
    assert evidence.source == "synthetic-replay"
    assert [(p.pid, p.job_kind, p.job_id) for p in evidence.processes] == [
        (4242, "slurm_job", "77")
    ]
    assert [(p.kind, p.achieved_rate) for p in evidence.probes] == [("gemm", 1.5)]
    assert evidence.host == host_facts(HOST)


@pytest.mark.parametrize(
    ("start_s", "end_s", "start_ns", "end_ns"),
    [
        (T0, T0 + 10.0, 1_700_000_000_000_000_000, 1_700_000_010_000_000_000),
        (T0 + 0.5, T0 + 1.0, 1_700_000_000_500_000_000, 1_700_000_001_000_000_000),
        (0.001, 0.002, 1_000_000, 2_000_000),
        (1.5e-7, 2.5e-7, 150, 250),
    ],
    ids=["whole-seconds", "half-second", "milliseconds", "sub-microsecond"],
)
def test_window_bounds_are_converted_to_nanoseconds(
    start_s: float, end_s: float, start_ns: int, end_ns: int
) -> None:
    evidence = build(claims(start_unix_s=start_s, end_unix_s=end_s))

    assert (evidence.window_start_unix_ns, evidence.window_end_unix_ns) == (start_ns, end_ns)


@given(
    st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
)
def test_window_bounds_are_the_nearest_nanosecond_and_keep_their_order(
    start_s: float, duration_s: float
) -> None:
    end_s = start_s + duration_s
    evidence = build(claims(start_unix_s=start_s, end_unix_s=end_s))

    for seconds, ns in (
        (start_s, evidence.window_start_unix_ns),
        (end_s, evidence.window_end_unix_ns),
    ):
        # Nearest integer, give or take the rounding of one float64 product.
        tolerance = Fraction(1, 2) + Fraction(math.ulp(seconds * NS_PER_S))
        assert abs(ns - Fraction(seconds) * NS_PER_S) <= tolerance
    assert evidence.window_start_unix_ns <= evidence.window_end_unix_ns


FEATURE_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=24)
FEATURE_VALUES = st.floats(allow_nan=False, allow_infinity=False)


@given(st.dictionaries(FEATURE_NAMES, FEATURE_VALUES, max_size=40), st.randoms())
def test_features_are_sorted_by_name_whatever_the_dict_order(
    features: dict[str, float], rng: Random
) -> None:
    names = list(features)
    rng.shuffle(names)
    shuffled = {name: features[name] for name in names}
    first = build(claims(gpus=(GpuFeatures(0, "GPU-0", 10, features),)))
    second = build(claims(gpus=(GpuFeatures(0, "GPU-0", 10, shuffled),)))

    (gpu,) = first.gpus
    assert [f.name for f in gpu.features] == sorted(features)
    assert {f.name: f.value for f in gpu.features} == features
    # The signed bytes must not depend on how the features were gathered.
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True
    )


@given(st.permutations([0, 1, 2, 3]))
def test_gpus_are_sorted_by_index(order: list[int]) -> None:
    gpus = tuple(
        GpuFeatures(index, f"GPU-synthetic-{index}", 100 + index, {"power_mean_w": 10.0 * index})
        for index in order
    )

    evidence = build(claims(gpus=gpus))

    assert [(g.gpu_index, g.gpu_uuid, g.sample_count) for g in evidence.gpus] == [
        (index, f"GPU-synthetic-{index}", 100 + index) for index in range(4)
    ]
    assert [g.features[0].value for g in evidence.gpus] == [0.0, 10.0, 20.0, 30.0]


# ---- host_facts ------------------------------------------------------------------------


def test_host_facts_maps_every_field_including_mig() -> None:
    facts = host_facts(HOST)

    assert (facts.hostname, facts.driver_version, facts.nvml_version) == (
        "host-a",
        "550.54.15",
        "12.550.54.15",
    )
    assert [
        (g.index, g.uuid, g.name, g.memory_total_mib, g.power_limit_w, g.gpm_supported)
        for g in facts.gpus
    ] == [
        (0, "GPU-synthetic-0000", "NVIDIA A100-SXM4-80GB", 81920, 400.0, False),
        (1, "GPU-synthetic-0001", "NVIDIA H100 80GB HBM3", 81559, 700.0, True),
    ]
    assert [
        (m.gpu_instance_id, m.compute_instance_id, m.uuid, m.profile)
        for m in facts.gpus[0].mig_instances
    ] == [(1, 0, "MIG-synthetic-0001", "3g.40gb"), (2, 0, "MIG-synthetic-0002", "3g.40gb")]
    assert list(facts.gpus[1].mig_instances) == []


def test_host_facts_of_a_host_without_gpus_has_none() -> None:
    facts = host_facts(HostDescription(hostname="bare"))

    assert (facts.hostname, facts.driver_version, list(facts.gpus)) == ("bare", "", [])


# ---- signing ---------------------------------------------------------------------------


def test_signed_evidence_verifies_with_the_signers_key() -> None:
    evidence = build(claims(gpus=(GpuFeatures(0, "GPU-0", 4, {"b": 2.0, "a": 1.0}),)))

    envelope_bytes = sign_evidence(evidence, SIGNER)
    verified = verify(
        parse_envelope(envelope_bytes), trust(SIGNER.public_key), frozenset({EVIDENCE_PAYLOAD_TYPE})
    )

    assert (verified.payload_type, verified.key_id) == (EVIDENCE_PAYLOAD_TYPE, SIGNER.key_id)
    assert verified.payload == evidence.SerializeToString(deterministic=True)
    assert Evidence.FromString(verified.payload) == evidence
    # Deterministic: re-signing the same evidence gives the same bytes, hence the same hash.
    assert sign_evidence(evidence, SIGNER) == envelope_bytes


def _other_key(envelope: Envelope) -> Callable[[str], PublicKey | None]:
    return lambda key_id: OTHER_SIGNER.public_key


def _no_key(envelope: Envelope) -> Callable[[str], PublicKey | None]:
    return lambda key_id: None


def _alter_payload(envelope: Envelope) -> Callable[[str], PublicKey | None]:
    envelope.payload = envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1])
    return trust(SIGNER.public_key)


def _relabel_as_gap_notice(envelope: Envelope) -> Callable[[str], PublicKey | None]:
    envelope.payload_type = GAP_NOTICE_PAYLOAD_TYPE
    return trust(SIGNER.public_key)


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (_other_key, SignatureError),
        (_no_key, UnknownKeyError),
        (_alter_payload, SignatureError),
        (_relabel_as_gap_notice, SignatureError),
    ],
    ids=["another-agents-key", "unknown-key", "payload-altered", "payload-type-relabelled"],
)
def test_signed_evidence_does_not_verify_when_tampered_or_untrusted(
    tamper: Callable[[Envelope], Callable[[str], PublicKey | None]], error: type[Exception]
) -> None:
    envelope = parse_envelope(sign_evidence(build(claims()), SIGNER))
    lookup = tamper(envelope)

    with pytest.raises(error):
        verify(envelope, lookup, frozenset({EVIDENCE_PAYLOAD_TYPE, GAP_NOTICE_PAYLOAD_TYPE}))


def _gap_notice() -> bytes:
    return sign_gap_notice(
        agent_id="agent-1",
        signer=SIGNER,
        first_missing=3,
        last_missing=9,
        previous_sha256=GENESIS_HASH,
        last_missing_sha256=PREVIOUS,
        reason="spool cap reached",
        created_unix_ns=1_700_000_000_000_000_001,
    )


def test_gap_notice_is_signed_and_names_the_lost_range() -> None:
    verified = verify(
        parse_envelope(_gap_notice()),
        trust(SIGNER.public_key),
        frozenset({GAP_NOTICE_PAYLOAD_TYPE}),
    )

    notice = GapNotice.FromString(verified.payload)
    assert (verified.payload_type, verified.key_id) == (GAP_NOTICE_PAYLOAD_TYPE, SIGNER.key_id)
    assert (notice.agent_id, notice.key_id) == ("agent-1", SIGNER.key_id)
    assert (notice.first_missing, notice.last_missing) == (3, 9)
    assert notice.previous_envelope_sha256 == GENESIS_HASH
    assert notice.last_missing_envelope_sha256 == PREVIOUS
    assert (notice.reason, notice.created_unix_ns) == (
        "spool cap reached",
        1_700_000_000_000_000_001,
    )


def test_gap_notice_is_not_accepted_where_evidence_is_expected() -> None:
    with pytest.raises(PayloadTypeError):
        verify(
            parse_envelope(_gap_notice()),
            trust(SIGNER.public_key),
            frozenset({EVIDENCE_PAYLOAD_TYPE}),
        )
