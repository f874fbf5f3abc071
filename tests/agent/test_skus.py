"""NVML device names map to the right reference figures."""

from __future__ import annotations

import pytest

from agent.skus import SKUS, sku_for

NAMES = [
    ("NVIDIA A100-SXM4-80GB", 0, "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", 0, "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", 0, "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", 0, "A100 PCIe 40GB"),
    ("NVIDIA A100-SXM4", 40_536, "A100 SXM 40GB"),
    ("NVIDIA A100-SXM4", 81_920, "A100 SXM 80GB"),
    ("NVIDIA H100 80GB HBM3", 0, "H100 SXM 80GB"),
    ("NVIDIA H100 PCIe", 81_559, "H100 PCIe 80GB"),
    ("NVIDIA H200", 0, "H200 SXM 141GB"),
    ("NVIDIA GeForce RTX 4090", 0, None),
    ("", 0, None),
]


@pytest.mark.parametrize(
    ("name", "memory", "expected"), NAMES, ids=[n[0] or "empty" for n in NAMES]
)
def test_sku_for_nvml_name(name: str, memory: int, expected: str | None) -> None:
    sku = sku_for(name, memory)
    assert (sku.name if sku else None) == expected


@pytest.mark.parametrize("sku", SKUS, ids=[s.name for s in SKUS])
def test_reference_figures_are_consistent(sku: object) -> None:
    from agent.skus import Sku

    assert isinstance(sku, Sku)
    assert sku.tf32_tflops * 2 == pytest.approx(sku.bf16_tflops, rel=0.01)
    assert 0.5 < sku.achievable_matmul_frac <= 1.0
    assert 0.5 < sku.achievable_bandwidth_frac <= 1.0
    assert sku.sources
