"""The verifier's trust core: appraise one envelope against what is already known.

It does no I/O. What it needs to know (keys, the agent's chain state, stored hashes,
nonces) comes through an :class:`AppraisalContext` the caller supplies, and it answers with
an :class:`Accepted` or :class:`Duplicate` result or raises :class:`AppraisalError`
carrying the reason and the gRPC status name the service returns.

Order of checks matters: nothing from the payload is read before a trusted key's
signature verifies over the exact bytes (DSSE), and nothing is stored unless every
check passes.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from proto import envelope as dsse
from proto.errors import (
    GpuattestError,
    LimitError,
    MalformedError,
    PayloadTypeError,
    SignatureError,
    UnknownKeyError,
)
from proto.evidence_pb2 import Evidence, GapNotice
from proto.limits import WireLimits
from proto.signing import PublicKey
from server.classify import Classifier
from server.records import (
    AcceptedEnvelope,
    AgentState,
    AttributedProcess,
    GapRecord,
    GpuVerdict,
    KeyRecord,
    NonceRecord,
)

NS_PER_S = 1_000_000_000
MAX_SEQUENCE = 2**63 - 1
PAYLOAD_TYPES = frozenset({dsse.EVIDENCE_PAYLOAD_TYPE, dsse.GAP_NOTICE_PAYLOAD_TYPE})

# gRPC status names, kept as strings so this core does not depend on grpc.
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"

# Sanity bounds by the unit suffix of a feature name (names carry their unit by
# convention, see agent/samples.py). First matching suffix wins; None = unbounded side.
_FEATURE_BOUNDS: tuple[tuple[str, float | None, float | None], ...] = (
    ("_per_s", -1e12, 1e12),  # slopes may fall as well as rise
    ("_pct", 0.0, 100.0),
    ("_frac", 0.0, 1.0),
    ("_frac_of_limit", 0.0, 3.0),  # transient power can exceed the enforced limit briefly
    ("_w", 0.0, 5_000.0),
    ("_j", 0.0, 1e9),
    ("_mib", 0.0, float(1 << 24)),  # 16 TiB: far above any GPU
    ("_mhz", 0.0, 20_000.0),
    ("_c", -50.0, 150.0),
    ("_s", 0.0, 86_400.0),
    ("_count", 0.0, 1e7),
    ("_corr", -1.0, 1.0),
    ("periodicity", 0.0, 1.0),
)
# The bounds an unbounded side gets in the vectorised check: finite, so that one
# comparison low <= value <= high also fails for NaN and +-inf, as the finiteness check does.
_UNBOUNDED_LOW, _UNBOUNDED_HIGH = -sys.float_info.max, sys.float_info.max
# Feature layouts (a window's feature names, in order) remembered at most. The names come
# from agents, so the cache is bounded; an honest fleet sends a handful of layouts.
_MAX_CACHED_LAYOUTS = 256
# Layouts with longer names are not remembered (not worth the memory; rejected anyway
# under the default limits).
_MAX_CACHED_NAME_BYTES = WireLimits().max_string_bytes

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class AppraisalPolicy:
    """Tunable limits of appraisal; the wire limits are hard, the skew is site policy."""

    limits: WireLimits = field(default_factory=WireLimits)
    max_future_skew_ns: int = 30 * NS_PER_S


class AppraisalError(GpuattestError):
    """An envelope was rejected; nothing from it may be stored."""

    def __init__(
        self, code: str, reason: str, detail: str, observed_gap: GapRecord | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.code = code
        self.reason = reason
        self.detail = detail
        # An out-of-order arrival reveals missing sequences; the caller records them.
        self.observed_gap = observed_gap
        # Set once the signature is verified: whose envelope it was ("" before that).
        self.agent_id = ""


@dataclass(frozen=True)
class Accepted:
    """The envelope passed every check; store ``record``."""

    record: AcceptedEnvelope


@dataclass(frozen=True)
class Duplicate:
    """The exact envelope is already stored: acknowledge it again, store nothing."""

    agent_id: str
    sequence: int


class AppraisalContext(Protocol):
    """What appraisal needs to know about the world, supplied by the caller."""

    def key(self, key_id: str) -> KeyRecord | None:
        """The enrolled key with this id, revoked or not; None when unknown."""
        ...

    def agent_state(self, agent_id: str) -> AgentState | None:
        """Where the agent's chain stands, including envelopes accepted earlier in a batch."""
        ...

    def stored_sha256(self, agent_id: str, sequence: int) -> bytes | None:
        """Hash of the envelope stored at that sequence, if any."""
        ...

    def nonce(self, nonce: bytes) -> NonceRecord | None:
        """The challenge nonce record, if the verifier issued it."""
        ...


def appraise(
    envelope_bytes: bytes,
    context: AppraisalContext,
    classifier: Classifier,
    policy: AppraisalPolicy,
    now_unix_ns: int,
) -> Accepted | Duplicate:
    """Appraise one serialized envelope. Raises AppraisalError on any failed check."""
    verified, key = _authenticate(envelope_bytes, context, policy)
    envelope_hash = dsse.envelope_sha256(envelope_bytes)
    try:
        if verified.payload_type == dsse.GAP_NOTICE_PAYLOAD_TYPE:
            notice = _parse(GapNotice, verified.payload)
            return _appraise_gap_notice(
                notice, key, envelope_bytes, envelope_hash, context, now_unix_ns
            )
        evidence = _parse(Evidence, verified.payload)
        return _appraise_evidence(
            evidence, key, envelope_bytes, envelope_hash, context, classifier, policy, now_unix_ns
        )
    except AppraisalError as error:
        # The signer is authenticated: it may learn where its own chain stands.
        error.agent_id = key.agent_id
        raise


def _authenticate(
    envelope_bytes: bytes, context: AppraisalContext, policy: AppraisalPolicy
) -> tuple[dsse.VerifiedPayload, KeyRecord]:
    try:
        envelope = dsse.parse_envelope(envelope_bytes, policy.limits)
    except LimitError as exc:
        raise AppraisalError(RESOURCE_EXHAUSTED, "envelope_too_large", str(exc)) from exc
    except MalformedError as exc:
        raise AppraisalError(INVALID_ARGUMENT, "malformed_envelope", str(exc)) from exc

    def public_key(key_id: str) -> PublicKey | None:
        record = context.key(key_id)
        return PublicKey(record.public_key) if record else None

    try:
        verified = dsse.verify(envelope, public_key, PAYLOAD_TYPES)
    except UnknownKeyError as exc:
        raise AppraisalError(UNAUTHENTICATED, "unknown_key", str(exc)) from exc
    except PayloadTypeError as exc:
        raise AppraisalError(INVALID_ARGUMENT, "payload_type", str(exc)) from exc
    except SignatureError as exc:
        reason = "missing_signature" if not envelope.signatures else "bad_signature"
        raise AppraisalError(UNAUTHENTICATED, reason, str(exc)) from exc
    key = context.key(verified.key_id)
    assert key is not None  # verify() only succeeds with a key the context returned
    if key.revoked:
        raise AppraisalError(PERMISSION_DENIED, "key_revoked", f"key {key.key_id} is revoked")
    return verified, key


_Payload = TypeVar("_Payload", Evidence, GapNotice)


def _parse(message_type: type[_Payload], payload: bytes) -> _Payload:
    message = message_type()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise AppraisalError(
            INVALID_ARGUMENT, "malformed_payload", f"{message_type.__name__}: {exc}"
        ) from exc
    return message


def _check_identity(agent_id: str, key_id: str, key: KeyRecord) -> None:
    # A stolen key must never speak for another agent: the payload's claims must name
    # the key that signed it and the agent that key was enrolled for.
    if key_id != key.key_id or agent_id != key.agent_id:
        raise AppraisalError(
            PERMISSION_DENIED,
            "agent_key_mismatch",
            f"payload claims agent {agent_id!r} key {key_id[:16]!r}; "
            f"signed by key {key.key_id[:16]} of agent {key.agent_id!r}",
        )


def _chain_state(agent_id: str, context: AppraisalContext) -> AgentState:
    state = context.agent_state(agent_id)
    if state is None:
        raise AppraisalError(UNAUTHENTICATED, "unknown_agent", f"agent {agent_id!r} not enrolled")
    return state


def _check_sequence(
    agent_id: str,
    sequence: int,
    envelope_hash: bytes,
    state: AgentState,
    context: AppraisalContext,
    now_unix_ns: int,
    expected_first: int | None = None,
) -> Duplicate | None:
    """Duplicate for an identical resend; raise for conflicts and gaps; None to go on."""
    if sequence == 0:
        raise AppraisalError(INVALID_ARGUMENT, "sequence_zero", "sequences start at 1")
    if sequence > MAX_SEQUENCE:
        # Stored as signed 64-bit integers; no agent gets anywhere near this honestly.
        raise AppraisalError(INVALID_ARGUMENT, "sequence_too_large", f"{sequence} > {MAX_SEQUENCE}")
    if sequence <= state.acked_sequence:
        if context.stored_sha256(agent_id, sequence) == envelope_hash:
            return Duplicate(agent_id, sequence)
        raise AppraisalError(
            FAILED_PRECONDITION,
            "sequence_conflict",
            f"sequence {sequence} is already settled with different content",
        )
    first = sequence if expected_first is None else expected_first
    expected = state.acked_sequence + 1
    if first != expected:
        raise AppraisalError(
            FAILED_PRECONDITION,
            "sequence_gap",
            f"expected sequence {expected}, got {first}",
            observed_gap=GapRecord(agent_id, expected, first - 1, "observed", now_unix_ns)
            if first > expected
            else None,
        )
    return None


def _check_chain(previous_sha256: bytes, state: AgentState) -> None:
    if previous_sha256 != state.last_envelope_sha256:
        raise AppraisalError(
            FAILED_PRECONDITION,
            "chain_mismatch",
            f"previous_envelope_sha256 does not match the envelope at {state.acked_sequence}",
        )


def _appraise_gap_notice(
    notice: GapNotice,
    key: KeyRecord,
    envelope_bytes: bytes,
    envelope_hash: bytes,
    context: AppraisalContext,
    now_unix_ns: int,
) -> Accepted | Duplicate:
    _check_identity(notice.agent_id, notice.key_id, key)
    state = _chain_state(notice.agent_id, context)
    if notice.last_missing < notice.first_missing or notice.first_missing == 0:
        raise AppraisalError(
            INVALID_ARGUMENT,
            "gap_range",
            f"gap {notice.first_missing}..{notice.last_missing} is empty",
        )
    expected = state.acked_sequence + 1
    if notice.first_missing < expected <= notice.last_missing:
        # Envelopes the spool dropped while they were already in flight can still have
        # been stored: the notice then overlaps the acknowledged range. Only the rest is
        # lost, and the notice must chain from what the verifier holds before it.
        first_lost = expected
        _check_previous_stored(notice, context)
    else:
        duplicate = _check_sequence(
            notice.agent_id,
            notice.last_missing,
            envelope_hash,
            state,
            context,
            now_unix_ns,
            expected_first=notice.first_missing,
        )
        if duplicate:
            return duplicate
        first_lost = notice.first_missing
        _check_chain(notice.previous_envelope_sha256, state)
    if len(notice.last_missing_envelope_sha256) != len(dsse.GENESIS_HASH):
        raise AppraisalError(INVALID_ARGUMENT, "gap_hash", "last_missing_envelope_sha256 size")
    return Accepted(
        AcceptedEnvelope(
            agent_id=notice.agent_id,
            sequence=notice.last_missing,
            envelope=envelope_bytes,
            envelope_sha256=envelope_hash,
            chain_head_sha256=notice.last_missing_envelope_sha256,
            payload_type=dsse.GAP_NOTICE_PAYLOAD_TYPE,
            received_unix_ns=now_unix_ns,
            window_start_unix_ns=0,
            window_end_unix_ns=0,
            source="gap-notice",
            nonce=b"",
            declared_gap=(first_lost, notice.last_missing),
        )
    )


def _check_previous_stored(notice: GapNotice, context: AppraisalContext) -> None:
    before = notice.first_missing - 1
    stored = context.stored_sha256(notice.agent_id, before) if before else dsse.GENESIS_HASH
    if stored != notice.previous_envelope_sha256:
        raise AppraisalError(
            FAILED_PRECONDITION,
            "chain_mismatch",
            f"gap notice does not chain from the envelope stored at {before}",
        )


def _appraise_evidence(
    evidence: Evidence,
    key: KeyRecord,
    envelope_bytes: bytes,
    envelope_hash: bytes,
    context: AppraisalContext,
    classifier: Classifier,
    policy: AppraisalPolicy,
    now_unix_ns: int,
) -> Accepted | Duplicate:
    _check_identity(evidence.agent_id, evidence.key_id, key)
    state = _chain_state(evidence.agent_id, context)
    duplicate = _check_sequence(
        evidence.agent_id, evidence.sequence, envelope_hash, state, context, now_unix_ns
    )
    if duplicate:
        return duplicate
    _check_chain(evidence.previous_envelope_sha256, state)
    _check_counts(evidence, policy.limits)
    windows = _read_windows(evidence)
    _check_strings(evidence, windows, policy.limits)
    _check_window(evidence, policy, now_unix_ns)
    _check_nonce(evidence, context, now_unix_ns)
    _check_values(evidence, windows)
    return Accepted(
        AcceptedEnvelope(
            agent_id=evidence.agent_id,
            sequence=evidence.sequence,
            envelope=envelope_bytes,
            envelope_sha256=envelope_hash,
            chain_head_sha256=envelope_hash,
            payload_type=dsse.EVIDENCE_PAYLOAD_TYPE,
            received_unix_ns=now_unix_ns,
            window_start_unix_ns=evidence.window_start_unix_ns,
            window_end_unix_ns=evidence.window_end_unix_ns,
            source=evidence.source,
            nonce=evidence.nonce,
            gpus=_classify_gpus(evidence, windows, classifier),
            processes=tuple(
                AttributedProcess(
                    p.gpu_index, p.pid, p.used_memory_mib, p.job_kind, p.job_id, p.trusted
                )
                for p in evidence.processes
            ),
        )
    )


def _check_counts(evidence: Evidence, limits: WireLimits) -> None:
    counts = (
        ("too_many_gpus", len(evidence.gpus), limits.max_gpus_per_window),
        ("too_many_processes", len(evidence.processes), limits.max_processes),
        ("too_many_probes", len(evidence.probes), limits.max_probes),
        (
            "too_many_features",
            max((len(g.features) for g in evidence.gpus), default=0),
            limits.max_features_per_gpu,
        ),
    )
    for reason, count, limit in counts:
        if count > limit:
            raise AppraisalError(RESOURCE_EXHAUSTED, reason, f"{count} > {limit}")


@dataclass(frozen=True)
class _FeatureLayout:
    """What the checks need to know about one window's feature names, worked out once.

    An agent sends the same names in the same order in every window, so this is looked up
    by the names instead of checking every name of every window again.
    """

    names: tuple[str, ...]
    distinct: bool  # no name repeats
    longest_name_bytes: int  # UTF-8
    low: FloatArray  # per feature, finite (see _UNBOUNDED_LOW)
    high: FloatArray

    @classmethod
    def of(cls, names: tuple[str, ...]) -> _FeatureLayout:
        """Work out the layout of ``names``."""
        bounds = [_finite_bounds(name) for name in names]
        return cls(
            names=names,
            distinct=len(set(names)) == len(names),
            longest_name_bytes=max((len(name.encode("utf-8")) for name in names), default=0),
            low=np.array([low for low, _ in bounds], dtype=np.float64),
            high=np.array([high for _, high in bounds], dtype=np.float64),
        )


_LAYOUTS: dict[tuple[str, ...], _FeatureLayout] = {}


def _layout(names: tuple[str, ...]) -> _FeatureLayout:
    layout = _LAYOUTS.get(names)
    if layout is None:
        layout = _FeatureLayout.of(names)
        if (
            len(_LAYOUTS) < _MAX_CACHED_LAYOUTS
            and layout.longest_name_bytes <= _MAX_CACHED_NAME_BYTES
        ):
            _LAYOUTS[names] = layout
    return layout


def _feature_bounds(name: str) -> tuple[float | None, float | None]:
    """The sanity bounds of a feature by its name's unit suffix; (None, None) if it has none."""
    for suffix, low, high in _FEATURE_BOUNDS:
        if name.endswith(suffix):
            return low, high
    return None, None


def _finite_bounds(name: str) -> tuple[float, float]:
    low, high = _feature_bounds(name)
    return (
        _UNBOUNDED_LOW if low is None else low,
        _UNBOUNDED_HIGH if high is None else high,
    )


@dataclass(frozen=True)
class _WindowValues:
    """One GPU window's feature names (as a layout) and values, read from the payload once."""

    layout: _FeatureLayout
    values: list[float]

    def features(self) -> dict[str, float]:
        """Name to value; the names are distinct once the values are checked."""
        return dict(zip(self.layout.names, self.values, strict=True))


def _read_windows(evidence: Evidence) -> list[_WindowValues]:
    windows = []
    for window in evidence.gpus:
        # One list of the feature messages, read twice: iterating the repeated field
        # itself twice would build every message's wrapper twice.
        features = list(window.features)
        names = tuple([feature.name for feature in features])
        windows.append(_WindowValues(_layout(names), [feature.value for feature in features]))
    return windows


def _check_strings(
    evidence: Evidence, windows: Sequence[_WindowValues], limits: WireLimits
) -> None:
    longest_name = max((window.layout.longest_name_bytes for window in windows), default=0)
    if longest_name > limits.max_string_bytes or any(
        _longer_than(text, limits.max_string_bytes) for text in _strings(evidence)
    ):
        raise AppraisalError(
            RESOURCE_EXHAUSTED,
            "string_too_long",
            f"a string exceeds {limits.max_string_bytes} bytes",
        )


def _longer_than(text: str, max_bytes: int) -> bool:
    # UTF-8 takes at most 4 bytes a character: most strings need no encoding to tell.
    return len(text) * 4 > max_bytes and len(text.encode("utf-8")) > max_bytes


def _strings(evidence: Evidence) -> Iterable[str]:
    yield from (evidence.agent_id, evidence.key_id, evidence.source)
    host = evidence.host
    yield from (host.hostname, host.driver_version, host.nvml_version)
    for gpu in host.gpus:
        yield from (gpu.uuid, gpu.name)
        for mig in gpu.mig_instances:
            yield from (mig.uuid, mig.profile)
    # Feature names are checked through their layouts (_check_strings).
    for window in evidence.gpus:
        yield window.gpu_uuid
    for probe in evidence.probes:
        yield from (probe.kind, probe.device, probe.unit, probe.identity)
    for process in evidence.processes:
        yield from (process.job_kind, process.job_id, process.cgroup_path)


def _check_window(evidence: Evidence, policy: AppraisalPolicy, now_unix_ns: int) -> None:
    start, end = evidence.window_start_unix_ns, evidence.window_end_unix_ns
    limits = policy.limits
    longest = int((limits.max_window_seconds + limits.window_tolerance_seconds) * NS_PER_S)
    if start <= 0 or end <= start:
        raise AppraisalError(
            INVALID_ARGUMENT, "window_invalid", f"window [{start}, {end}) is empty"
        )
    if end - start > longest:
        raise AppraisalError(
            INVALID_ARGUMENT, "window_too_long", f"window of {(end - start) / NS_PER_S:.3f} s"
        )
    if end > now_unix_ns + policy.max_future_skew_ns:
        raise AppraisalError(
            FAILED_PRECONDITION,
            "window_in_future",
            f"window ends {(end - now_unix_ns) / NS_PER_S:.1f} s in the future",
        )


def _check_nonce(evidence: Evidence, context: AppraisalContext, now_unix_ns: int) -> None:
    if not evidence.nonce:
        return
    record = context.nonce(evidence.nonce)
    if record is None or record.agent_id != evidence.agent_id:
        raise AppraisalError(FAILED_PRECONDITION, "nonce_unknown", "nonce was not issued to agent")
    if record.used:
        raise AppraisalError(FAILED_PRECONDITION, "nonce_used", "nonce was already answered")
    if now_unix_ns > record.expires_unix_ns:
        raise AppraisalError(FAILED_PRECONDITION, "nonce_expired", "nonce expired before use")


def _check_values(evidence: Evidence, windows: Sequence[_WindowValues]) -> None:
    if not _values_pass(evidence, windows):
        # Something is wrong: find and name it exactly as a check one by one does.
        _check_values_one_by_one(evidence)
    for probe in evidence.probes:
        for value in (probe.achieved_rate, probe.reference_rate, probe.ratio, probe.duration_s):
            _check_finite_non_negative(f"probe {probe.kind}", value)


def _values_pass(evidence: Evidence, windows: Sequence[_WindowValues]) -> bool:
    """Whether every GPU window passes every check of _check_values_one_by_one, at once.

    One vectorised comparison of all of an envelope's feature values against their
    layouts' bounds, instead of a Python call per feature.
    """
    if len({window.gpu_index for window in evidence.gpus}) != len(windows):
        return False
    if not all(window.layout.distinct for window in windows):
        return False
    if not windows:
        return True
    values = np.fromiter(
        itertools.chain.from_iterable(window.values for window in windows), dtype=np.float64
    )
    low = np.concatenate([window.layout.low for window in windows])
    high = np.concatenate([window.layout.high for window in windows])
    # NaN fails both comparisons and +-inf fails a finite bound: no isfinite needed.
    return bool(np.all((low <= values) & (values <= high)))


def _check_values_one_by_one(evidence: Evidence) -> None:
    seen_gpus: set[int] = set()
    for window in evidence.gpus:
        if window.gpu_index in seen_gpus:
            raise AppraisalError(
                INVALID_ARGUMENT, "duplicate_gpu", f"GPU {window.gpu_index} appears twice"
            )
        seen_gpus.add(window.gpu_index)
        names = [feature.name for feature in window.features]
        if len(set(names)) != len(names):
            raise AppraisalError(
                INVALID_ARGUMENT, "duplicate_feature", f"GPU {window.gpu_index} repeats a feature"
            )
        for feature in window.features:
            _check_feature(window.gpu_index, feature.name, feature.value)


def _check_feature(gpu_index: int, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise AppraisalError(
            INVALID_ARGUMENT, "non_finite_value", f"GPU {gpu_index} feature {name} is {value}"
        )
    low, high = _feature_bounds(name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise AppraisalError(
            INVALID_ARGUMENT,
            "value_out_of_range",
            f"GPU {gpu_index} feature {name}={value} outside [{low}, {high}]",
        )


def _check_finite_non_negative(what: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise AppraisalError(INVALID_ARGUMENT, "value_out_of_range", f"{what} value {value}")


def _classify_gpus(
    evidence: Evidence, windows: Sequence[_WindowValues], classifier: Classifier
) -> tuple[GpuVerdict, ...]:
    features = [window.features() for window in windows]
    # All GPU windows of the envelope in one call: the fitted model scores them together.
    verdicts = classifier.classify_many(features)
    start, end = evidence.window_start_unix_ns, evidence.window_end_unix_ns
    model_version = classifier.model_version
    return tuple(
        GpuVerdict(
            gpu_index=window.gpu_index,
            gpu_uuid=window.gpu_uuid,
            start_unix_ns=start,
            end_unix_ns=end,
            sample_count=window.sample_count,
            features=window_features,
            verdict=verdict,
            confidence=confidence,
            model_version=model_version,
        )
        for window, window_features, (verdict, confidence) in zip(
            evidence.gpus, features, verdicts, strict=True
        )
    )
