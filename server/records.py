"""Plain records passed between the appraisal core, the store and the service.

They hold no I/O and no SQLAlchemy state, so the appraisal core can be tested with
hand-built values and the store can be swapped (SQLite today, PostgreSQL later).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyRecord:
    """An enrolled public key and whom it speaks for."""

    key_id: str
    agent_id: str
    public_key: bytes
    revoked: bool


@dataclass(frozen=True)
class AgentState:
    """Where an agent's evidence chain stands at the verifier."""

    agent_id: str
    acked_sequence: int  # highest contiguous sequence stored (0: none yet)
    last_envelope_sha256: bytes  # hash of the envelope at acked_sequence (genesis: 32 zero bytes)


@dataclass(frozen=True)
class NonceRecord:
    """A challenge nonce issued to one agent."""

    nonce: bytes
    agent_id: str
    expires_unix_ns: int
    used: bool


@dataclass(frozen=True)
class GpuVerdict:
    """Appraised result of one GPU over one window."""

    gpu_index: int
    gpu_uuid: str
    start_unix_ns: int
    end_unix_ns: int
    sample_count: int
    features: dict[str, float]
    verdict: str  # "training" | "inference" | "idle"
    confidence: float
    model_version: str


@dataclass(frozen=True)
class AttributedProcess:
    """A GPU process and the job it was attributed to, as the agent claimed it."""

    gpu_index: int
    pid: int
    used_memory_mib: int
    job_kind: str
    job_id: str
    trusted: bool


@dataclass(frozen=True)
class AcceptedEnvelope:
    """An envelope that passed appraisal, ready to be stored in one transaction."""

    agent_id: str
    sequence: int
    envelope: bytes  # exact bytes as received
    envelope_sha256: bytes
    # What the next envelope's previous_envelope_sha256 must equal: the envelope's own hash,
    # or for a gap notice the hash of the last envelope the agent lost.
    chain_head_sha256: bytes
    payload_type: str
    received_unix_ns: int
    window_start_unix_ns: int  # 0 for a gap notice
    window_end_unix_ns: int
    source: str
    nonce: bytes  # b"" when not a challenge answer
    gpus: tuple[GpuVerdict, ...] = ()
    processes: tuple[AttributedProcess, ...] = ()
    # Set for a gap notice: the inclusive range of sequences the agent declares lost.
    # The notice itself is stored at sequence == last_missing.
    declared_gap: tuple[int, int] | None = None


@dataclass(frozen=True)
class GapRecord:
    """Sequences missing from an agent's chain, and how the verifier learnt of it."""

    agent_id: str
    first_missing: int
    last_missing: int
    kind: str  # "declared" (agent's signed gap notice) | "observed" (arrived out of order)
    detected_unix_ns: int


@dataclass(frozen=True)
class AgentSummary:
    """One agent, for `gpuattest verifier agents`."""

    agent_id: str
    hostname: str
    key_id: str
    revoked: bool
    acked_sequence: int
    windows_stored: int
    gaps: int  # declared losses plus out-of-order gaps not yet filled
    last_seen_unix_ns: int  # 0: never


@dataclass(frozen=True)
class WindowRow:
    """One stored GPU window, for `gpuattest verifier windows`."""

    agent_id: str
    sequence: int
    gpu_index: int
    gpu_uuid: str
    start_unix_ns: int
    end_unix_ns: int
    verdict: str
    confidence: float
    model_version: str
    source: str
    features: dict[str, float] = field(default_factory=dict)
