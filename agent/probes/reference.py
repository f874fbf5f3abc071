"""Compare a probe with the reference of the SKU the device claims to be.

The reference is the rate an idle device of that SKU reaches in published measurements:
the dense peak times the achievable fraction (``agent.skus``). The ratio ``achieved /
reference`` decides the identity claim:

* above the band's upper edge the device is faster than its SKU can be (a better GPU
  reported as a lesser one, or a wrong name): ``inconsistent`` whatever the tenant does;
* below the lower edge it is ``inconsistent`` only when the tenant was idle, because a
  busy tenant legitimately slows the probe (that slowdown is the contention feature);
* with no reference (unknown model, a CPU, launch latency) it is ``unknown-sku``.

The bands are provisional: they follow the published spread of measured rates but have not
been calibrated on real hardware by this project (no GPU was available).
"""

from __future__ import annotations

from agent.probes.measurement import Identity, ProbeKind, ProbeMeasurement
from agent.samples import GpuDescription
from agent.skus import Sku, sku_for
from proto.evidence_pb2 import ProbeResult
from proto.limits import DEFAULT_LIMITS

# Ratio to the SKU's achievable rate that an idle device of that SKU should land in.
CONSISTENT_BAND: dict[ProbeKind, tuple[float, float]] = {
    ProbeKind.GEMM: (0.70, 1.15),
    ProbeKind.BANDWIDTH: (0.70, 1.15),
}
# The tenant counts as idle below this busy fraction (NVML utilization / 100).
IDLE_BUSY_FRAC = 0.05
GB_PER_TB = 1000.0


def reference_rate(kind: ProbeKind, precision: str, sku: Sku) -> float | None:
    """The rate an idle ``sku`` reaches for this probe, in the probe's unit; None if unknown."""
    if kind is ProbeKind.GEMM:
        peak = {"bf16": sku.bf16_tflops, "fp16": sku.fp16_tflops}.get(precision)
        return None if peak is None else peak * sku.achievable_matmul_frac
    if kind is ProbeKind.BANDWIDTH:
        return sku.hbm_tb_s * GB_PER_TB * sku.achievable_bandwidth_frac
    return None


def judge_identity(kind: ProbeKind, ratio: float, tenant_busy_frac: float | None) -> Identity:
    """``consistent`` or ``inconsistent`` for a ratio to a known reference."""
    low, high = CONSISTENT_BAND[kind]
    if ratio > high:
        return Identity.INCONSISTENT
    tenant_idle = tenant_busy_frac is not None and tenant_busy_frac < IDLE_BUSY_FRAC
    if ratio < low and tenant_idle:
        return Identity.INCONSISTENT
    return Identity.CONSISTENT


def probe_result(
    measurement: ProbeMeasurement, gpu: GpuDescription | None, tenant_busy_frac: float | None
) -> ProbeResult:
    """The signed-evidence form of ``measurement`` with its SKU reference, ratio and identity.

    ``gpu`` is what NVML reports for the probed device (None for a CPU probe);
    ``tenant_busy_frac`` is the tenant's recent utilization of it, None when unknown.
    """
    sku = None
    if gpu is not None and measurement.device_kind == "cuda":
        sku = sku_for(gpu.name, gpu.memory_total_mib)
    reference = (
        None if sku is None else reference_rate(measurement.kind, measurement.precision, sku)
    )
    ratio = 0.0
    identity = Identity.UNKNOWN_SKU
    if reference:
        ratio = measurement.rate / reference
        identity = judge_identity(measurement.kind, ratio, tenant_busy_frac)
    return ProbeResult(
        gpu_index=measurement.gpu_index,
        kind=str(measurement.kind),
        device=_fit(measurement.device),
        achieved_rate=measurement.rate,
        unit=measurement.unit,
        reference_rate=reference or 0.0,
        ratio=ratio,
        identity=str(identity),
        duration_s=measurement.duration_s,
    )


def _fit(text: str) -> str:
    # The verifier refuses longer strings; a device name never needs more.
    return text.encode()[: DEFAULT_LIMITS.max_string_bytes].decode(errors="ignore")
