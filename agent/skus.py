"""Reference figures of the data-centre GPUs gpuattest attests (dense, no sparsity).

Used by the probes (does this GPU deliver roughly what its SKU should?) and by compute
accounting (peak rate times measured activity). Figures are NVIDIA's published peaks; the
achievable fractions are what published measurements reach on an idle device.

Sources:
- [A100] NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s BF16/FP16, 156 TF32;
  HBM2e 1,555 GB/s (40 GB) / 1,935 GB/s (80 GB PCIe) / 2,039 GB/s (80 GB SXM);
  TDP 400 W (SXM), 250 W (40 GB PCIe), 300 W (80 GB PCIe).
- [H100] NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 989 BF16, 495 TF32, 1,979 FP8,
  3.35 TB/s, up to 700 W; PCIe 756 BF16, 378 TF32, 1,513 FP8, 2.0 TB/s, 350 W.
- [H200] NVIDIA H200 Tensor Core GPU product brief (2024): SXM 989 BF16, 495 TF32,
  1,979 FP8, 4.8 TB/s, up to 700 W.
- [MEAS] Measured BF16 matmul rates collected in ../shared/REFERENCES.md: A100 SXM ~271,
  A100 PCIe ~253, H100 SXM ~795, H200 SXM ~830 TFLOP/s; an idle-GPU bandwidth probe
  typically reaches 85-92 % of the HBM figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sku:
    """Published peak figures of one GPU model."""

    name: str
    # Lower-case substrings that identify the model in NVML's device name.
    name_markers: tuple[str, ...]
    memory_gib: int
    bf16_tflops: float
    fp16_tflops: float
    tf32_tflops: float
    fp8_tflops: float | None
    hbm_tb_s: float
    tdp_w: float
    # Fraction of the BF16 peak a large matmul reaches on an idle device (measured).
    achievable_matmul_frac: float
    # Fraction of the HBM figure a device-to-device copy reaches on an idle device.
    achievable_bandwidth_frac: float
    sources: tuple[str, ...]


SKUS: tuple[Sku, ...] = (
    Sku("A100 SXM 80GB", ("a100", "sxm", "80gb"), 80, 312, 312, 156, None, 2.039, 400,
        271 / 312, 0.88, ("A100", "MEAS")),
    Sku("A100 SXM 40GB", ("a100", "sxm", "40gb"), 40, 312, 312, 156, None, 1.555, 400,
        271 / 312, 0.88, ("A100", "MEAS")),
    Sku("A100 PCIe 80GB", ("a100", "pcie", "80gb"), 80, 312, 312, 156, None, 1.935, 300,
        253 / 312, 0.88, ("A100", "MEAS")),
    Sku("A100 PCIe 40GB", ("a100", "pcie", "40gb"), 40, 312, 312, 156, None, 1.555, 250,
        253 / 312, 0.88, ("A100", "MEAS")),
    Sku("H100 SXM 80GB", ("h100", "hbm3"), 80, 989, 989, 495, 1979, 3.35, 700,
        795 / 989, 0.88, ("H100", "MEAS")),
    Sku("H100 PCIe 80GB", ("h100", "pcie"), 80, 756, 756, 378, 1513, 2.0, 350,
        0.80, 0.88, ("H100", "MEAS")),
    Sku("H200 SXM 141GB", ("h200",), 141, 989, 989, 495, 1979, 4.8, 700,
        830 / 989, 0.88, ("H200", "MEAS")),
)  # fmt: skip


def sku_for(gpu_name: str, memory_total_mib: int = 0) -> Sku | None:
    """The SKU whose markers all appear in NVML's device name, or None when unknown.

    NVML names look like "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3" (SXM),
    "NVIDIA H100 PCIe", "NVIDIA H200". When the name lacks the memory size, the device's
    memory decides between the 40 GB and 80 GB parts.
    """
    name = gpu_name.lower().replace("-", " ")
    if memory_total_mib and "gb" not in name:
        name += f" {_memory_class_gib(memory_total_mib)}gb"
    candidates = [sku for sku in SKUS if all(marker in name for marker in sku.name_markers)]
    return candidates[0] if candidates else None


def _memory_class_gib(memory_total_mib: int) -> int:
    # NVML reports a little less than the marketing size (e.g. 81,559 MiB for 80 GB).
    return 40 if memory_total_mib < 60 * 1024 else 80
