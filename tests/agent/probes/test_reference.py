"""Probe results against the SKU the device claims: reference, ratio and identity."""

from __future__ import annotations

import pytest

from agent.probes.measurement import UNITS, DeviceKind, Identity, ProbeKind, ProbeMeasurement
from agent.probes.reference import judge_identity, probe_result, reference_rate
from agent.samples import GpuDescription
from agent.skus import sku_for

H100 = GpuDescription(0, "GPU-synthetic-0", "NVIDIA H100 80GB HBM3", 81559, 700.0, True)
A100 = GpuDescription(1, "GPU-synthetic-1", "NVIDIA A100-SXM4-80GB", 81920, 400.0, False)
UNKNOWN = GpuDescription(2, "GPU-synthetic-2", "NVIDIA GeForce RTX 4090", 24564, 450.0, False)


def measured(
    kind: ProbeKind, rate: float, gpu: GpuDescription = H100, device_kind: DeviceKind = "cuda"
) -> ProbeMeasurement:
    return ProbeMeasurement(
        gpu_index=gpu.index,
        kind=kind,
        device=f"cuda:{gpu.index} {gpu.name}" if device_kind == "cuda" else "cpu",
        device_kind=device_kind,
        precision="bf16" if kind is ProbeKind.GEMM else "",
        size=4096,
        rate=rate,
        unit=UNITS[kind],
        duration_s=0.001,
        repeats=5,
        ci95_rel=0.02,
        confident=True,
    )


def test_h100_references_are_peak_times_achievable_fraction() -> None:
    sku = sku_for(H100.name, H100.memory_total_mib)
    assert sku is not None
    assert reference_rate(ProbeKind.GEMM, "bf16", sku) == pytest.approx(795.0)
    assert reference_rate(ProbeKind.BANDWIDTH, "", sku) == pytest.approx(3350 * 0.88)
    assert reference_rate(ProbeKind.GEMM, "fp32", sku) is None
    assert reference_rate(ProbeKind.LAUNCH_LATENCY, "", sku) is None


IDENTITY_CASES = [
    pytest.param(ProbeKind.GEMM, 1.0, 0.0, Identity.CONSISTENT, id="gemm-at-reference-idle"),
    pytest.param(ProbeKind.GEMM, 2.5, 0.0, Identity.INCONSISTENT, id="gemm-far-too-fast-idle"),
    pytest.param(ProbeKind.GEMM, 2.5, 1.0, Identity.INCONSISTENT, id="gemm-too-fast-even-busy"),
    pytest.param(ProbeKind.GEMM, 0.3, 0.0, Identity.INCONSISTENT, id="gemm-too-slow-idle"),
    pytest.param(ProbeKind.GEMM, 0.3, 0.97, Identity.CONSISTENT, id="gemm-slow-under-load"),
    pytest.param(ProbeKind.GEMM, 0.3, None, Identity.CONSISTENT, id="gemm-slow-load-unknown"),
    pytest.param(ProbeKind.BANDWIDTH, 0.6, 0.0, Identity.INCONSISTENT, id="copy-too-slow-idle"),
    pytest.param(ProbeKind.BANDWIDTH, 0.9, 0.0, Identity.CONSISTENT, id="copy-typical-idle"),
]


@pytest.mark.parametrize(("kind", "ratio", "busy", "expected"), IDENTITY_CASES)
def test_identity_judgement(
    kind: ProbeKind, ratio: float, busy: float | None, expected: Identity
) -> None:
    assert judge_identity(kind, ratio, busy) is expected


def test_an_a100_reported_as_h100_is_inconsistent() -> None:
    # An idle A100 reaches ~271 TFLOP/s: far below an H100's 795.
    result = probe_result(measured(ProbeKind.GEMM, 271.0), H100, tenant_busy_frac=0.0)
    assert result.identity == "inconsistent"
    assert result.ratio == pytest.approx(271 / 795)


def test_an_h100_reported_as_a100_is_inconsistent() -> None:
    result = probe_result(measured(ProbeKind.GEMM, 790.0, A100), A100, tenant_busy_frac=0.9)
    assert result.identity == "inconsistent"


def test_a_typical_idle_h100_is_consistent() -> None:
    result = probe_result(measured(ProbeKind.BANDWIDTH, 2900.0), H100, tenant_busy_frac=0.0)
    assert result.identity == "consistent"
    assert result.unit == "GB/s"
    assert result.reference_rate > 0


UNKNOWN_CASES = [
    pytest.param(measured(ProbeKind.GEMM, 80.0, UNKNOWN), UNKNOWN, id="unknown-model"),
    pytest.param(measured(ProbeKind.GEMM, 0.1, H100, "cpu"), None, id="cpu-probe"),
    pytest.param(measured(ProbeKind.LAUNCH_LATENCY, 6.0), H100, id="latency-has-no-reference"),
]


@pytest.mark.parametrize(("measurement", "gpu"), UNKNOWN_CASES)
def test_no_reference_means_unknown_sku(
    measurement: ProbeMeasurement, gpu: GpuDescription | None
) -> None:
    result = probe_result(measurement, gpu, tenant_busy_frac=0.0)
    assert result.identity == "unknown-sku"
    assert result.reference_rate == 0.0
    assert result.ratio == 0.0
    assert result.achieved_rate == measurement.rate


def test_long_device_names_are_cut_to_the_wire_limit() -> None:
    measurement = measured(ProbeKind.GEMM, 700.0).model_copy(update={"device": "é" * 300})
    result = probe_result(measurement, H100, tenant_busy_frac=0.0)
    assert len(result.device.encode()) <= 256
