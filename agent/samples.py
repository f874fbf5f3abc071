"""What every collector produces: ticks of per-GPU samples, host facts, GPU processes.

Field names are canonical and carry their unit, so the NVML collector, the replay parser
and the feature code agree without a translation table. A field that a source cannot read
at some tick is simply absent from that sample (never zero, never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# Canonical sample fields: name -> (unit, one-line meaning). Collectors may emit any subset.
SAMPLE_FIELDS: dict[str, tuple[str, str]] = {
    "power_w": ("W", "instantaneous board power"),
    "power_avg_w": ("W", "NVML 1 s averaged power (nvmlDeviceGetPowerUsage)"),
    "energy_mj": ("mJ", "total energy since driver load, monotonic"),
    "util_gpu_pct": ("%", "fraction of time a kernel ran (utilization.gpu)"),
    "util_mem_pct": ("%", "fraction of time memory was read or written (utilization.memory)"),
    "mem_used_mib": ("MiB", "device memory in use"),
    "mem_total_mib": ("MiB", "device memory size"),
    "sm_clock_mhz": ("MHz", "SM clock"),
    "mem_clock_mhz": ("MHz", "memory clock"),
    "temperature_c": ("C", "GPU core temperature"),
    "throttle_reasons": ("bitmask", "NVML clock-event (throttle) reasons"),
    "pcie_tx_kib_s": ("KiB/s", "PCIe transmit throughput"),
    "pcie_rx_kib_s": ("KiB/s", "PCIe receive throughput"),
    "nvlink_tx_kib": ("KiB", "NVLink data transmitted, cumulative counter"),
    "nvlink_rx_kib": ("KiB", "NVLink data received, cumulative counter"),
    "sm_active_pct": ("%", "GPM SM activity"),
    "sm_occupancy_pct": ("%", "GPM SM occupancy"),
    "tensor_active_pct": ("%", "GPM tensor-pipe activity (any precision)"),
    "dram_bw_pct": ("%", "GPM DRAM bandwidth utilization"),
}


@dataclass(frozen=True)
class GpuSample:
    """One GPU's readings at one tick; ``values`` holds only the fields that were read."""

    gpu_index: int
    values: dict[str, float]


@dataclass(frozen=True)
class Tick:
    """All GPUs read at (nearly) one moment. ``t_unix_s`` is wall-clock seconds."""

    t_unix_s: float
    samples: tuple[GpuSample, ...]


@dataclass(frozen=True)
class MigDescription:
    """One MIG instance as NVML reports it."""

    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    profile: str


@dataclass(frozen=True)
class GpuDescription:
    """Static facts about one GPU; unknown text is "" and unknown numbers are 0."""

    index: int
    uuid: str = ""
    name: str = ""
    memory_total_mib: int = 0
    power_limit_w: float = 0.0
    gpm_supported: bool = False
    mig_instances: tuple[MigDescription, ...] = ()


@dataclass(frozen=True)
class HostDescription:
    """Static facts about the host and its GPUs."""

    hostname: str
    driver_version: str = ""
    nvml_version: str = ""
    gpus: tuple[GpuDescription, ...] = ()


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a compute context on a GPU."""

    gpu_index: int
    pid: int
    used_memory_mib: int = 0


@dataclass
class CollectorHealth:
    """Counts of degraded reads, by field, so operators see what a host cannot report."""

    errors_by_field: dict[str, int] = field(default_factory=dict)

    def record(self, field_name: str) -> None:
        """Count one failed read of ``field_name``."""
        self.errors_by_field[field_name] = self.errors_by_field.get(field_name, 0) + 1


class Collector(Protocol):
    """A source of ticks: live NVML or a replayed recording."""

    source: str  # "nvml" | "replay" | "synthetic-replay"

    def describe_host(self) -> HostDescription:
        """Static host and GPU facts."""
        ...

    def read_tick(self) -> Tick | None:
        """Read all GPUs now; None when a replayed recording is exhausted."""
        ...

    def processes(self) -> list[GpuProcess]:
        """Processes with a compute context on any GPU (may be slow: call every few s)."""
        ...

    def close(self) -> None:
        """Release the source (NVML shutdown, file handles)."""
        ...
