"""Golden envelopes built from fixed seeds; regenerate with
``python -m tests.proto.golden_vectors --write`` only when the wire format changes on purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path

from proto import envelope as dsse
from proto.evidence_pb2 import (
    Evidence,
    Feature,
    GapNotice,
    GpuInfo,
    GpuWindow,
    HostFacts,
    ProcessAttribution,
)
from proto.signing import Ed25519Signer

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
AGENT_SEED = bytes(range(32))
OTHER_SEED = bytes(range(32, 64))
WINDOW_START_NS = 1_780_000_000_000_000_000


def agent_signer() -> Ed25519Signer:
    """The fixed key every golden envelope is signed with."""
    return Ed25519Signer.from_seed(AGENT_SEED)


def _evidence(sequence: int, previous: bytes, signer: Ed25519Signer) -> Evidence:
    start = WINDOW_START_NS + (sequence - 1) * 10_000_000_000
    return Evidence(
        agent_id="agt-golden",
        key_id=signer.key_id,
        sequence=sequence,
        previous_envelope_sha256=previous,
        window_start_unix_ns=start,
        window_end_unix_ns=start + 10_000_000_000,
        host=HostFacts(
            hostname="golden-host",
            driver_version="550.54.15",
            gpus=[GpuInfo(index=0, uuid="GPU-golden-0", name="NVIDIA H100 80GB HBM3")],
        ),
        gpus=[
            GpuWindow(
                gpu_index=0,
                gpu_uuid="GPU-golden-0",
                sample_count=100,
                features=[
                    Feature(name="busy_frac", value=0.97),
                    Feature(name="power_mean_w", value=612.5),
                    Feature(name="util_gpu_mean_pct", value=96.25),
                ],
            )
        ],
        processes=[
            ProcessAttribution(
                gpu_index=0,
                pid=4242,
                used_memory_mib=41000,
                job_kind="slurm_job",
                job_id="1234",
                cgroup_path="/system.slice/slurmstepd.scope/job_1234",
                trusted=True,
            )
        ],
        raw_samples_sha256=bytes(32),
        source="replay",
        created_unix_ns=start + 10_100_000_000,
    )


def build_vectors() -> dict[str, bytes]:
    """Name -> exact envelope bytes. Ed25519 is deterministic, so these never vary."""
    signer = agent_signer()
    first = dsse.sign_envelope(
        dsse.EVIDENCE_PAYLOAD_TYPE,
        _evidence(1, dsse.GENESIS_HASH, signer).SerializeToString(deterministic=True),
        signer,
    )
    second = dsse.sign_envelope(
        dsse.EVIDENCE_PAYLOAD_TYPE,
        _evidence(2, dsse.envelope_sha256(first), signer).SerializeToString(deterministic=True),
        signer,
    )
    notice = GapNotice(
        agent_id="agt-golden",
        key_id=signer.key_id,
        first_missing=3,
        last_missing=5,
        previous_envelope_sha256=dsse.envelope_sha256(second),
        last_missing_envelope_sha256=bytes(range(32)),
        reason="spool cap reached",
        created_unix_ns=WINDOW_START_NS + 60_000_000_000,
    )
    gap = dsse.sign_envelope(
        dsse.GAP_NOTICE_PAYLOAD_TYPE, notice.SerializeToString(deterministic=True), signer
    )
    return {"evidence-1.bin": first, "evidence-2.bin": second, "gap-notice-3-5.bin": gap}


def main() -> int:
    """Write the vectors (only when the wire format changed on purpose)."""
    if "--write" not in sys.argv:
        print("pass --write to overwrite the committed golden vectors")
        return 2
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name, content in build_vectors().items():
        (GOLDEN_DIR / name).write_bytes(content)
        print(f"wrote {GOLDEN_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
