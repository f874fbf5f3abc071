"""The I/O-free appraisal core, against an in-memory context."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import envelope as dsse
from proto.evidence_pb2 import Evidence, Feature, GapNotice, GpuWindow
from proto.signing import Ed25519Signer
from server import appraisal
from server.appraisal import AppraisalError, AppraisalPolicy
from server.classify import ProvisionalRule
from server.records import AgentState, KeyRecord, NonceRecord

NOW = 1_790_000_000 * 10**9
S = 10**9
SIGNER = Ed25519Signer.from_seed(bytes([1]) * 32)
AGENT = "agt-test"


@dataclass
class MemoryContext:
    """AppraisalContext over dicts; ``accept`` plays the store's part."""

    keys: dict[str, KeyRecord] = field(default_factory=dict)
    states: dict[str, AgentState] = field(default_factory=dict)
    hashes: dict[tuple[str, int], bytes] = field(default_factory=dict)
    nonces: dict[bytes, NonceRecord] = field(default_factory=dict)

    def key(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def agent_state(self, agent_id: str) -> AgentState | None:
        return self.states.get(agent_id)

    def stored_sha256(self, agent_id: str, sequence: int) -> bytes | None:
        return self.hashes.get((agent_id, sequence))

    def nonce(self, nonce: bytes) -> NonceRecord | None:
        return self.nonces.get(nonce)

    def feed(self, envelope: bytes) -> appraisal.Accepted | appraisal.Duplicate:
        result = appraisal.appraise(envelope, self, ProvisionalRule(), AppraisalPolicy(), NOW)
        if isinstance(result, appraisal.Accepted):
            record = result.record
            self.states[AGENT] = AgentState(AGENT, record.sequence, record.chain_head_sha256)
            self.hashes[(AGENT, record.sequence)] = record.envelope_sha256
        return result


def enrolled() -> MemoryContext:
    context = MemoryContext()
    context.keys[SIGNER.key_id] = KeyRecord(SIGNER.key_id, AGENT, SIGNER.public_key.raw, False)
    context.states[AGENT] = AgentState(AGENT, 0, dsse.GENESIS_HASH)
    return context


def evidence(sequence: int, previous: bytes, **changes: object) -> Evidence:
    start = NOW - 100 * S + sequence * 10 * S
    message = Evidence(
        agent_id=AGENT,
        key_id=SIGNER.key_id,
        sequence=sequence,
        previous_envelope_sha256=previous,
        window_start_unix_ns=start,
        window_end_unix_ns=start + 10 * S,
        gpus=[
            GpuWindow(
                gpu_index=0,
                sample_count=100,
                features=[
                    Feature(name="busy_frac", value=1.0),
                    Feature(name="idle_frac", value=0.0),
                    Feature(name="util_gpu_std_pct", value=2.0),
                ],
            )
        ],
        source="replay",
    )
    for name, value in changes.items():
        setattr(message, name, value)
    return message


def sign(message: Evidence | GapNotice, payload_type: str = dsse.EVIDENCE_PAYLOAD_TYPE) -> bytes:
    return dsse.sign_envelope(payload_type, message.SerializeToString(), SIGNER)


def test_chain_of_three_is_accepted_and_classified() -> None:
    context = enrolled()
    previous = dsse.GENESIS_HASH
    for sequence in (1, 2, 3):
        envelope = sign(evidence(sequence, previous))
        result = context.feed(envelope)
        assert isinstance(result, appraisal.Accepted)
        assert result.record.gpus[0].verdict == "training"
        assert result.record.gpus[0].model_version == ProvisionalRule.model_version
        previous = dsse.envelope_sha256(envelope)
    assert context.states[AGENT].acked_sequence == 3


def test_identical_resend_is_a_duplicate() -> None:
    context = enrolled()
    envelope = sign(evidence(1, dsse.GENESIS_HASH))
    context.feed(envelope)
    assert context.feed(envelope) == appraisal.Duplicate(AGENT, 1)


def _reason(context: MemoryContext, envelope: bytes) -> tuple[str, str]:
    with pytest.raises(AppraisalError) as caught:
        context.feed(envelope)
    return caught.value.code, caught.value.reason


def test_different_content_for_a_settled_sequence_conflicts() -> None:
    context = enrolled()
    context.feed(sign(evidence(1, dsse.GENESIS_HASH)))
    other = sign(evidence(1, dsse.GENESIS_HASH, source="nvml"))
    assert _reason(context, other) == ("FAILED_PRECONDITION", "sequence_conflict")


def test_gap_is_refused_and_reported_as_observed() -> None:
    context = enrolled()
    with pytest.raises(AppraisalError) as caught:
        context.feed(sign(evidence(4, dsse.GENESIS_HASH)))
    gap = caught.value.observed_gap
    assert gap is not None
    assert (gap.first_missing, gap.last_missing, gap.kind) == (1, 3, "observed")


def test_gap_notice_moves_the_chain_past_lost_sequences() -> None:
    context = enrolled()
    first = sign(evidence(1, dsse.GENESIS_HASH))
    context.feed(first)
    lost_hash = bytes(range(32))
    notice = GapNotice(
        agent_id=AGENT,
        key_id=SIGNER.key_id,
        first_missing=2,
        last_missing=4,
        previous_envelope_sha256=dsse.envelope_sha256(first),
        last_missing_envelope_sha256=lost_hash,
    )
    result = context.feed(sign(notice, dsse.GAP_NOTICE_PAYLOAD_TYPE))
    assert isinstance(result, appraisal.Accepted)
    assert result.record.declared_gap == (2, 4)
    assert result.record.sequence == 4
    assert isinstance(context.feed(sign(evidence(5, lost_hash))), appraisal.Accepted)


@pytest.mark.parametrize(
    ("first", "last", "reason"),
    [(3, 4, "sequence_gap"), (2, 1, "gap_range"), (0, 0, "gap_range")],
    ids=["not-next", "reversed", "zero"],
)
def test_bad_gap_notice(first: int, last: int, reason: str) -> None:
    context = enrolled()
    notice = GapNotice(
        agent_id=AGENT,
        key_id=SIGNER.key_id,
        first_missing=first,
        last_missing=last,
        previous_envelope_sha256=dsse.GENESIS_HASH,
        last_missing_envelope_sha256=bytes(32),
    )
    assert _reason(context, sign(notice, dsse.GAP_NOTICE_PAYLOAD_TYPE))[1] == reason


def _with_feature(name: str, value: float) -> Evidence:
    message = evidence(1, dsse.GENESIS_HASH)
    message.gpus[0].features.append(Feature(name=name, value=value))
    return message


VALUE_CASES = [
    ("nan", _with_feature("power_mean_w", math.nan), "non_finite_value"),
    ("inf", _with_feature("x", math.inf), "non_finite_value"),
    ("negative power", _with_feature("power_mean_w", -1.0), "value_out_of_range"),
    ("util above 100", _with_feature("util_gpu_mean_pct", 1e6), "value_out_of_range"),
    ("fraction above 1", _with_feature("busy_frac_x_frac", 1.5), "value_out_of_range"),
    ("duplicate feature", _with_feature("busy_frac", 0.5), "duplicate_feature"),
    ("zero sequence", evidence(0, dsse.GENESIS_HASH), "sequence_zero"),
    (
        "empty window",
        evidence(1, dsse.GENESIS_HASH, window_end_unix_ns=NOW - 100 * S + 10 * S),
        "window_invalid",
    ),
    ("window too long", evidence(1, dsse.GENESIS_HASH, window_end_unix_ns=NOW), "window_too_long"),
    (
        "window from the future",
        evidence(
            1, dsse.GENESIS_HASH, window_start_unix_ns=NOW + 60 * S, window_end_unix_ns=NOW + 65 * S
        ),
        "window_in_future",
    ),
    (
        "other agent's id",
        evidence(1, dsse.GENESIS_HASH, agent_id="agt-other"),
        "agent_key_mismatch",
    ),
    ("broken chain", evidence(1, bytes([9]) * 32), "chain_mismatch"),
    ("unknown nonce", evidence(1, dsse.GENESIS_HASH, nonce=b"n" * 32), "nonce_unknown"),
]


@pytest.mark.parametrize(
    ("name", "message", "reason"), VALUE_CASES, ids=[c[0] for c in VALUE_CASES]
)
def test_invalid_evidence_is_rejected(name: str, message: Evidence, reason: str) -> None:
    assert _reason(enrolled(), sign(message))[1] == reason


@pytest.mark.parametrize(
    ("expires", "used", "reason"),
    [(NOW - 1, False, "nonce_expired"), (NOW + S, True, "nonce_used")],
    ids=["expired", "used"],
)
def test_stale_nonce(expires: int, used: bool, reason: str) -> None:
    context = enrolled()
    context.nonces[b"n" * 32] = NonceRecord(b"n" * 32, AGENT, expires, used)
    assert _reason(context, sign(evidence(1, dsse.GENESIS_HASH, nonce=b"n" * 32)))[1] == reason


def test_fresh_nonce_is_accepted() -> None:
    context = enrolled()
    context.nonces[b"n" * 32] = NonceRecord(b"n" * 32, AGENT, NOW + S, False)
    result = context.feed(sign(evidence(1, dsse.GENESIS_HASH, nonce=b"n" * 32)))
    assert isinstance(result, appraisal.Accepted)
    assert result.record.nonce == b"n" * 32


def test_revoked_key_is_denied() -> None:
    context = enrolled()
    context.keys[SIGNER.key_id] = replace(context.keys[SIGNER.key_id], revoked=True)
    assert _reason(context, sign(evidence(1, dsse.GENESIS_HASH))) == (
        "PERMISSION_DENIED",
        "key_revoked",
    )


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_appraisal(data: bytes) -> None:
    with pytest.raises(AppraisalError):
        enrolled().feed(data)


def _notice(first: int, last: int, previous: bytes, lost_hash: bytes) -> bytes:
    notice = GapNotice(
        agent_id=AGENT,
        key_id=SIGNER.key_id,
        first_missing=first,
        last_missing=last,
        previous_envelope_sha256=previous,
        last_missing_envelope_sha256=lost_hash,
    )
    return sign(notice, dsse.GAP_NOTICE_PAYLOAD_TYPE)


def test_gap_notice_overlapping_delivered_envelopes_declares_only_the_rest() -> None:
    """The agent dropped 2..4 while 2 was in flight and got stored after all."""
    context = enrolled()
    first = sign(evidence(1, dsse.GENESIS_HASH))
    second = sign(evidence(2, dsse.envelope_sha256(first)))
    context.feed(first)
    context.feed(second)
    lost_hash = bytes(range(32))
    result = context.feed(_notice(2, 4, dsse.envelope_sha256(first), lost_hash))
    assert isinstance(result, appraisal.Accepted)
    assert result.record.declared_gap == (3, 4)
    assert isinstance(context.feed(sign(evidence(5, lost_hash))), appraisal.Accepted)


def test_overlapping_gap_notice_must_chain_from_what_is_stored() -> None:
    context = enrolled()
    first = sign(evidence(1, dsse.GENESIS_HASH))
    context.feed(first)
    context.feed(sign(evidence(2, dsse.envelope_sha256(first))))
    assert _reason(context, _notice(2, 4, bytes([5]) * 32, bytes(32))) == (
        "FAILED_PRECONDITION",
        "chain_mismatch",
    )


# -- the whole-envelope value check names the same problem a check one by one names ----------


def _eight_gpus(bad_gpu: int | None = None, feature: Feature | None = None) -> Evidence:
    """Eight GPU windows like a real host's; ``feature`` appended to GPU ``bad_gpu``."""
    message = evidence(1, dsse.GENESIS_HASH)
    template = message.gpus[0]
    del message.gpus[:]
    for index in range(8):
        window = message.gpus.add()
        window.CopyFrom(template)
        window.gpu_index = index
        if index == bad_gpu and feature is not None:
            window.features.append(feature)
    return message


def _rejection(message: Evidence) -> AppraisalError:
    with pytest.raises(AppraisalError) as caught:
        enrolled().feed(sign(message))
    return caught.value


BAD_VALUES_IN_A_LATER_GPU = [
    pytest.param(
        Feature(name="power_mean_w", value=-1.0),
        "value_out_of_range",
        "GPU 5 feature power_mean_w=-1.0 outside [0.0, 5000.0]",
        id="out-of-range",
    ),
    pytest.param(
        Feature(name="x_unbounded", value=-math.inf),
        "non_finite_value",
        "GPU 5 feature x_unbounded is -inf",
        id="infinite-without-bounds",
    ),
    pytest.param(
        Feature(name="busy_frac", value=0.5),
        "duplicate_feature",
        "GPU 5 repeats a feature",
        id="repeated-feature",
    ),
]


@pytest.mark.parametrize(("feature", "reason", "detail"), BAD_VALUES_IN_A_LATER_GPU)
def test_a_bad_value_in_the_sixth_gpu_is_named_precisely(
    feature: Feature, reason: str, detail: str
) -> None:
    rejection = _rejection(_eight_gpus(5, feature))
    assert (rejection.code, rejection.reason, rejection.detail) == (
        "INVALID_ARGUMENT",
        reason,
        detail,
    )


def test_a_gpu_listed_twice_in_eight_is_named() -> None:
    message = _eight_gpus()
    message.gpus[6].gpu_index = 2
    assert _rejection(message).detail == "GPU 2 appears twice"


EDGE_VALUES_ACCEPTED = [
    pytest.param(Feature(name="util_gpu_mean_pct", value=100.0), id="upper-bound-itself"),
    pytest.param(Feature(name="power_lockstep_corr", value=-1.0), id="lower-bound-itself"),
    pytest.param(Feature(name="x_unbounded", value=-1.7e308), id="huge-finite-without-bounds"),
]


@pytest.mark.parametrize("feature", EDGE_VALUES_ACCEPTED)
def test_values_on_the_edges_are_accepted(feature: Feature) -> None:
    assert isinstance(enrolled().feed(sign(_eight_gpus(3, feature))), appraisal.Accepted)


def test_a_feature_name_over_the_string_limit_is_refused() -> None:
    long_name = Feature(name="x" * 257 + "_pct", value=1.0)
    assert _rejection(_eight_gpus(1, long_name)).reason == "string_too_long"


SUFFIXES = [suffix for suffix, _, _ in appraisal._FEATURE_BOUNDS] + ["_unbounded"]


@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from(SUFFIXES), st.floats(width=64)), min_size=0, max_size=6),
        min_size=1,
        max_size=4,
    )
)
def test_the_whole_envelope_check_passes_exactly_when_one_by_one_passes(
    gpus: list[list[tuple[str, float]]],
) -> None:
    message = evidence(1, dsse.GENESIS_HASH)
    del message.gpus[:]
    for index, features in enumerate(gpus):
        window = message.gpus.add(gpu_index=index)
        for position, (suffix, value) in enumerate(features):
            window.features.append(Feature(name=f"f{position % 4}{suffix}", value=value))
    windows = appraisal._read_windows(message)
    try:
        appraisal._check_values_one_by_one(message)
    except AppraisalError:
        passes_one_by_one = False
    else:
        passes_one_by_one = True
    assert appraisal._values_pass(message, windows) == passes_one_by_one
