"""FLOP estimate per GPU window, always with an error band.

Two routes, best first (the SKU figures come from :mod:`agent.skus`, sources there):

* **GPM present** (``tensor_active_mean_pct``, Hopper and later): FLOP = tensor-pipe activity x
  the SKU's matmul rate x (SM clock / boost clock) x seconds. Tensor activity does not say which
  precision ran, so the band spans TF32 (low) to FP8 at peak (high); the middle assumes BF16 at
  the fraction of peak a large matmul reaches on an idle device (measured, ``agent.skus``).
* **Energy only**: FLOP = energy above idle x a FLOP-per-joule band. The band comes from the
  SKU's BF16 peak over its dynamic power range (TDP - idle) at model-FLOP utilisations of
  10 % / 35 % / 60 % (35 % is typical of large-model training; 60 % is about the best
  reported). Without a known SKU the band spans A100 PCIe to H100 SXM. This is a rough
  estimate (a factor of ~2-3 either way); a FLOP-calibrated power model per SKU would narrow it.

Windows judged idle contribute nothing: an idle GPU's energy buys no arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.skus import SKUS, Sku, sku_for

TERA = 1e12
# Model-FLOP utilisation assumed at the low / middle / high end of the energy band.
_MFU_BAND = (0.10, 0.35, 0.60)
# Idle draw as a share of TDP (A100 ~50 W of 400 W, H100 ~70 W of 700 W).
_IDLE_TDP_FRAC = 0.1
# Boost SM clocks at which the datasheet peaks are quoted (NVIDIA datasheets, MHz).
BOOST_CLOCK_MHZ: dict[str, float] = {
    "A100 SXM 80GB": 1410.0,
    "A100 SXM 40GB": 1410.0,
    "A100 PCIe 80GB": 1410.0,
    "A100 PCIe 40GB": 1410.0,
    "H100 SXM 80GB": 1980.0,
    "H100 PCIe 80GB": 1755.0,
    "H200 SXM 141GB": 1980.0,
}


@dataclass(frozen=True)
class FlopEstimate:
    """Estimated floating-point operations with a low-high band, and how it was reached."""

    low: float
    mid: float
    high: float
    method: str  # "gpm", "energy", "energy-generic", "idle", "none", or "mixed"

    def __add__(self, other: FlopEstimate) -> FlopEstimate:
        method = self.method if self.method == other.method else "mixed"
        if self.method == "none":
            method = other.method
        elif other.method == "none":
            method = self.method
        return FlopEstimate(
            self.low + other.low, self.mid + other.mid, self.high + other.high, method
        )

    def describe(self) -> str:
        """Human-readable, e.g. ``3.1e+17 FLOP (1.0e+17-6.2e+17, energy)``."""
        if self.method == "none":
            return "no estimate (neither tensor activity nor energy)"
        return f"{self.mid:.2g} FLOP ({self.low:.2g}-{self.high:.2g}, {self.method})"


NO_ESTIMATE = FlopEstimate(0.0, 0.0, 0.0, "none")


def window_flop(
    features: Mapping[str, float],
    duration_s: float,
    gpu_name: str = "",
    label: str = "",
    memory_total_mib: int = 0,
) -> FlopEstimate:
    """FLOP one GPU did in one window, from its features (see the module docstring)."""
    if label == "idle":
        return FlopEstimate(0.0, 0.0, 0.0, "idle")
    sku = sku_for(gpu_name, memory_total_mib) if gpu_name else None
    tensor_pct = features.get("tensor_active_mean_pct")
    if sku is not None and tensor_pct is not None and math.isfinite(tensor_pct):
        return _from_tensor_activity(sku, tensor_pct / 100.0, features, duration_s)
    energy_j = features.get("energy_j")
    if energy_j is not None and math.isfinite(energy_j) and duration_s > 0:
        return _from_energy(sku, energy_j, duration_s)
    return NO_ESTIMATE


def _clock_ratio(sku: Sku, features: Mapping[str, float]) -> float:
    clock = features.get("sm_clock_mean_mhz")
    boost = BOOST_CLOCK_MHZ.get(sku.name)
    if clock is None or boost is None or not math.isfinite(clock) or clock <= 0:
        return 1.0
    return min(1.0, clock / boost)


def _from_tensor_activity(
    sku: Sku, activity: float, features: Mapping[str, float], duration_s: float
) -> FlopEstimate:
    busy_s = max(0.0, min(1.0, activity)) * _clock_ratio(sku, features) * duration_s
    top = sku.fp8_tflops if sku.fp8_tflops is not None else sku.bf16_tflops
    return FlopEstimate(
        low=busy_s * sku.tf32_tflops * sku.achievable_matmul_frac * TERA,
        mid=busy_s * sku.bf16_tflops * sku.achievable_matmul_frac * TERA,
        high=busy_s * top * TERA,
        method="gpm",
    )


def _flop_per_joule(sku: Sku) -> tuple[float, float, float]:
    dynamic_w = sku.tdp_w * (1.0 - _IDLE_TDP_FRAC)
    low, mid, high = (mfu * sku.bf16_tflops * TERA / dynamic_w for mfu in _MFU_BAND)
    return low, mid, high


def _from_energy(sku: Sku | None, energy_j: float, duration_s: float) -> FlopEstimate:
    skus = [sku] if sku is not None else list(SKUS)
    bands = [_flop_per_joule(s) for s in skus]
    per_joule = (
        min(b[0] for b in bands),
        math.exp(_mean_log(b[1] for b in bands)),
        max(b[2] for b in bands),
    )
    idle_w = _IDLE_TDP_FRAC * min(s.tdp_w for s in skus)
    dynamic_j = max(0.0, energy_j - idle_w * duration_s)
    ceiling = duration_s * max(s.bf16_tflops for s in skus) * TERA  # nothing beats the peak
    low, mid, high = (min(ceiling, dynamic_j * rate) for rate in per_joule)
    return FlopEstimate(low, mid, high, "energy" if sku is not None else "energy-generic")


def _mean_log(values: Iterable[float]) -> float:
    logs = [math.log(v) for v in values]
    return sum(logs) / len(logs)


def sum_flop(estimates: Iterable[FlopEstimate]) -> FlopEstimate:
    """Total of several estimates (bands add: the errors are assumed to move together)."""
    total = NO_ESTIMATE
    for estimate in estimates:
        total = total + estimate
    return total
