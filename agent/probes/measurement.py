"""What one probe reports: the wire format between the probe worker and the daemon."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ProbeKind(StrEnum):
    """The probe kernels."""

    GEMM = "gemm"
    BANDWIDTH = "bandwidth"
    LAUNCH_LATENCY = "launch_latency"


class Identity(StrEnum):
    """Whether a probe's rate fits the SKU the device claims to be."""

    CONSISTENT = "consistent"
    INCONSISTENT = "inconsistent"
    UNKNOWN_SKU = "unknown-sku"  # no reference to compare with (unknown model, CPU, latency)


UNITS: dict[ProbeKind, str] = {
    ProbeKind.GEMM: "TFLOP/s",
    ProbeKind.BANDWIDTH: "GB/s",
    ProbeKind.LAUNCH_LATENCY: "us",
}
ALL_KINDS: tuple[ProbeKind, ...] = tuple(ProbeKind)
DeviceKind = Literal["cpu", "cuda"]


class ProbeMeasurement(BaseModel):
    """One probe run on one device, before it is compared with any reference.

    ``rate`` is the achieved rate in ``unit``: TFLOP/s for GEMM, GB/s (bytes read plus
    written) for bandwidth, microseconds per launch for launch latency (lower is better).
    Every rate comes from the median iteration time of the timed repeats.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_index: int = Field(ge=0)
    kind: ProbeKind
    device: str  # "cpu" or e.g. "cuda:0 NVIDIA H100 80GB HBM3"
    device_kind: DeviceKind
    precision: str  # "bf16" | "fp16" | "fp32" for GEMM, "" otherwise
    size: int = Field(ge=0)  # GEMM: matrix side; bandwidth: bytes per buffer; latency: 0
    rate: float = Field(gt=0, allow_inf_nan=False)
    unit: str
    # Wall time of the whole probe (sizing, warm-up and repeats): an upper bound on the
    # device time it took, which is what the duty-cycle governor charges.
    duration_s: float = Field(ge=0, allow_inf_nan=False)
    repeats: int = Field(ge=1)
    ci95_rel: float = Field(ge=0, allow_inf_nan=False)  # 95 % CI half-width / mean
    confident: bool
