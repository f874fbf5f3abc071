"""Turn a window of samples into signed evidence, and lost sequences into a gap notice."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.samples import HostDescription
from proto import envelope as dsse
from proto.evidence_pb2 import (
    Evidence,
    Feature,
    GapNotice,
    GpuInfo,
    GpuWindow,
    HostFacts,
    MigInstance,
    ProbeResult,
    ProcessAttribution,
)
from proto.signing import Signer

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class GpuFeatures:
    """One GPU's features over one window."""

    gpu_index: int
    gpu_uuid: str
    sample_count: int
    features: Mapping[str, float]


@dataclass(frozen=True)
class WindowClaims:
    """Everything the agent claims about one window, before it is numbered and signed."""

    start_unix_s: float
    end_unix_s: float
    host: HostDescription
    gpus: Sequence[GpuFeatures]
    raw_samples: bytes
    source: str
    processes: Sequence[ProcessAttribution] = ()
    probes: Sequence[ProbeResult] = ()
    nonce: bytes = b""


def host_facts(host: HostDescription) -> HostFacts:
    """The protobuf form of the host's static facts."""
    return HostFacts(
        hostname=host.hostname,
        driver_version=host.driver_version,
        nvml_version=host.nvml_version,
        gpus=[
            GpuInfo(
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                memory_total_mib=gpu.memory_total_mib,
                power_limit_w=gpu.power_limit_w,
                gpm_supported=gpu.gpm_supported,
                mig_instances=[
                    MigInstance(
                        gpu_instance_id=mig.gpu_instance_id,
                        compute_instance_id=mig.compute_instance_id,
                        uuid=mig.uuid,
                        profile=mig.profile,
                    )
                    for mig in gpu.mig_instances
                ],
            )
            for gpu in host.gpus
        ],
    )


def build_evidence(
    claims: WindowClaims,
    *,
    agent_id: str,
    key_id: str,
    sequence: int,
    previous_sha256: bytes,
    created_unix_ns: int,
) -> Evidence:
    """The evidence payload for one window, numbered and chained."""
    return Evidence(
        agent_id=agent_id,
        key_id=key_id,
        sequence=sequence,
        previous_envelope_sha256=previous_sha256,
        window_start_unix_ns=round(claims.start_unix_s * NS_PER_S),
        window_end_unix_ns=round(claims.end_unix_s * NS_PER_S),
        host=host_facts(claims.host),
        gpus=[
            GpuWindow(
                gpu_index=gpu.gpu_index,
                gpu_uuid=gpu.gpu_uuid,
                sample_count=gpu.sample_count,
                # Sorted by name so the signed bytes do not depend on dict order.
                features=[Feature(name=n, value=v) for n, v in sorted(gpu.features.items())],
            )
            for gpu in sorted(claims.gpus, key=lambda g: g.gpu_index)
        ],
        probes=list(claims.probes),
        processes=list(claims.processes),
        raw_samples_sha256=hashlib.sha256(claims.raw_samples).digest(),
        nonce=claims.nonce,
        source=claims.source,
        created_unix_ns=created_unix_ns,
    )


def sign_evidence(evidence: Evidence, signer: Signer) -> bytes:
    """The serialized envelope carrying ``evidence``."""
    payload = evidence.SerializeToString(deterministic=True)
    return dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, payload, signer)


def sign_gap_notice(
    *,
    agent_id: str,
    signer: Signer,
    first_missing: int,
    last_missing: int,
    previous_sha256: bytes,
    last_missing_sha256: bytes,
    reason: str,
    created_unix_ns: int,
) -> bytes:
    """A signed declaration that sequences first..last were lost before delivery."""
    notice = GapNotice(
        agent_id=agent_id,
        key_id=signer.key_id,
        first_missing=first_missing,
        last_missing=last_missing,
        previous_envelope_sha256=previous_sha256,
        last_missing_envelope_sha256=last_missing_sha256,
        reason=reason,
        created_unix_ns=created_unix_ns,
    )
    payload = notice.SerializeToString(deterministic=True)
    return dsse.sign_envelope(dsse.GAP_NOTICE_PAYLOAD_TYPE, payload, signer)
