"""The probe kernels. Imports torch: runs in the probe worker and in benchmarks only.

One code path for every device, parametrised by a :class:`ProbeDevice`:

* **GEMM**: ``C = A @ B`` with square matrices, bf16 (fp16 where bf16 is missing) on CUDA,
  fp32 on a CPU; rate in TFLOP/s from ``2 n^3`` operations per iteration;
* **bandwidth**: a device-to-device copy between two buffers several times larger than the
  last-level cache the device reports; rate in GB/s counting bytes read plus written;
* **launch latency**: a one-element in-place add followed by a synchronize, i.e. the round
  trip a tenant pays per tiny kernel; the median microseconds per launch.

Each probe sizes itself to run a few milliseconds on the device it meets (or reuses the
size of an earlier round), warms up once, then repeats until the mean is known to ±5 % at
95 % confidence or its time budget is spent (:mod:`agent.probes.confidence`). The rate is
taken from the median repeat: one repeat that an interrupt or another process's burst
lands in (on a CPU) must not decide the result; a tenant that slows the device throughout
slows the median too, which is the contention signal. On CUDA the
kernels are timed with CUDA events; on a CPU, where torch runs synchronously, with the wall
clock. Launch latency is a host-side round trip, so it is wall-clock timed everywhere.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from agent.probes.confidence import RepeatPolicy, Repeats, repeat_until_confident
from agent.probes.measurement import UNITS, ProbeKind, ProbeMeasurement
from proto.errors import GpuattestError

MIB = 1 << 20
# Floor on one timing: a CPU timer can read zero for a very short op.
_MIN_TIME_S = 1e-9
# Share of the device's free memory a probe may take: the tenant's memory comes first.
_CUDA_MEMORY_SHARE = 0.25
_CPU_MEMORY_CAP_BYTES = 1 << 30
_MIN_ITERATIONS = 40  # timings a long reference run takes at least
Clock = Callable[[], float]


class ProbeUnavailableError(GpuattestError):
    """A probe cannot run on this device (no CUDA, or too little free memory)."""


@dataclass(frozen=True)
class DeviceProfile:
    """How big and how long probes should be on one class of device."""

    gemm_iteration_s: float  # aim for one GEMM of about this long
    gemm_start_size: int  # the size calibration times first
    gemm_size_step: int  # matrix sides are multiples of this (tensor-core friendly)
    gemm_max_size: int
    bandwidth_iteration_s: float
    min_buffer_bytes: int  # large enough to defeat the caches
    max_buffer_bytes: int
    latency_batch: int  # launches per latency timing
    gemm_policy: RepeatPolicy
    bandwidth_policy: RepeatPolicy
    latency_policy: RepeatPolicy


# A CPU stands in for a GPU on machines without one. The budgets keep a steady-state GEMM
# probe within 20 ms on one core of this project's 2-core machine.
CPU_PROFILE = DeviceProfile(
    gemm_iteration_s=1.5e-3,
    gemm_start_size=256,
    gemm_size_step=64,
    gemm_max_size=2048,
    bandwidth_iteration_s=5e-3,
    min_buffer_bytes=64 * MIB,
    max_buffer_bytes=256 * MIB,
    latency_batch=16,
    gemm_policy=RepeatPolicy(min_repeats=3, max_repeats=32, budget_s=0.012),
    bandwidth_policy=RepeatPolicy(min_repeats=3, max_repeats=16, budget_s=0.05),
    latency_policy=RepeatPolicy(min_repeats=5, max_repeats=200, budget_s=0.005),
)
# On an H100 one 4096^3 bf16 GEMM takes ~0.17 ms at ~800 TFLOP/s, so a round of warm-up and
# a handful of repeats is ~1 ms. Not measured here: this project had no GPU.
CUDA_PROFILE = DeviceProfile(
    gemm_iteration_s=1.5e-4,
    gemm_start_size=2048,
    gemm_size_step=256,
    gemm_max_size=16384,
    bandwidth_iteration_s=1.5e-4,
    min_buffer_bytes=256 * MIB,
    max_buffer_bytes=2048 * MIB,
    latency_batch=4,
    gemm_policy=RepeatPolicy(min_repeats=3, max_repeats=32, budget_s=6e-4),
    bandwidth_policy=RepeatPolicy(min_repeats=3, max_repeats=32, budget_s=6e-4),
    latency_policy=RepeatPolicy(min_repeats=5, max_repeats=200, budget_s=5e-4),
)


@dataclass(frozen=True)
class ProbeDevice:
    """A device to probe and how to time work on it."""

    torch_device: torch.device
    label: str  # "cpu" or "cuda:<index> <name>"
    gpu_index: int  # reported with each measurement
    precision: str
    gemm_dtype: torch.dtype
    profile: DeviceProfile
    memory_cap_bytes: int  # the most a probe may allocate
    # Times host-side work: CPU kernels, and launch round trips everywhere. The wall clock
    # by default; tests pass time.thread_time so other processes on a shared machine do
    # not show up as a slower device.
    host_timer: Clock = time.perf_counter

    @property
    def is_cuda(self) -> bool:
        """True on a GPU."""
        return self.torch_device.type == "cuda"

    def synchronize(self) -> None:
        """Wait for queued work (a no-op on a CPU, where torch ops are synchronous)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def device_time(self, work: Callable[[], object]) -> float:
        """Seconds the device spent on ``work`` (CUDA events on a GPU, wall clock on a CPU)."""
        if not self.is_cuda:
            started = self.host_timer()
            work()
            return max(self.host_timer() - started, _MIN_TIME_S)
        start, end = _timing_event(), _timing_event()
        start.record()
        work()
        end.record()
        end.synchronize()
        return max(float(start.elapsed_time(end)) / 1e3, _MIN_TIME_S)  # ms -> s

    def device_times(self, work: Callable[[], object], count: int) -> list[float]:
        """Seconds of each of ``count`` back-to-back runs of ``work``.

        On a GPU every run sits between its own pair of events and the host waits once, at
        the end, so the device never idles between runs; on a CPU each run is timed alone.
        """
        if not self.is_cuda:
            return [self.device_time(work) for _ in range(count)]
        events = [(_timing_event(), _timing_event()) for _ in range(count)]
        for start, end in events:
            start.record()
            work()
            end.record()
        events[-1][1].synchronize()
        return [max(float(s.elapsed_time(e)) / 1e3, _MIN_TIME_S) for s, e in events]


def _timing_event() -> torch.cuda.Event:
    # torch leaves Event's constructor unannotated.
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def open_device(
    kind: Literal["auto", "cpu", "cuda"], gpu_index: int = 0, host_timer: Clock = time.perf_counter
) -> ProbeDevice:
    """The device to probe: CUDA device ``gpu_index`` when asked (or found, for "auto").

    The device is primed with one tiny GEMM first, so that one-off start-up costs (the
    CUDA context, the cuBLAS handle and its workspace, a CPU's thread pool) are not charged
    to the first probe.
    """
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    device = _cuda_device(gpu_index, host_timer) if use_cuda else _cpu_device(gpu_index, host_timer)
    _prime(device)
    if device.is_cuda:  # what is free once our own context and workspace exist
        free_bytes, _ = torch.cuda.mem_get_info(gpu_index)
        device = replace(device, memory_cap_bytes=int(free_bytes * _CUDA_MEMORY_SHARE))
    return device


def _cpu_device(gpu_index: int, host_timer: Clock) -> ProbeDevice:
    return ProbeDevice(
        torch_device=torch.device("cpu"),
        label="cpu",
        gpu_index=gpu_index,
        precision="fp32",
        gemm_dtype=torch.float32,
        profile=CPU_PROFILE,
        memory_cap_bytes=_CPU_MEMORY_CAP_BYTES,
        host_timer=host_timer,
    )


def _cuda_device(gpu_index: int, host_timer: Clock) -> ProbeDevice:
    if not torch.cuda.is_available():
        raise ProbeUnavailableError("CUDA probes requested but torch finds no CUDA device")
    if gpu_index >= torch.cuda.device_count():
        raise ProbeUnavailableError(f"no CUDA device {gpu_index} (MIG or CUDA_VISIBLE_DEVICES?)")
    torch.cuda.set_device(gpu_index)
    properties = torch.cuda.get_device_properties(gpu_index)
    # Buffers 4x the L2 cache make the copy stream from HBM, not from cache.
    l2_bytes = int(getattr(properties, "L2_cache_size", 0))
    profile = replace(
        CUDA_PROFILE, min_buffer_bytes=max(CUDA_PROFILE.min_buffer_bytes, 4 * l2_bytes)
    )
    bf16 = torch.cuda.is_bf16_supported()
    return ProbeDevice(
        torch_device=torch.device("cuda", gpu_index),
        label=f"cuda:{gpu_index} {properties.name}",
        gpu_index=gpu_index,
        precision="bf16" if bf16 else "fp16",
        gemm_dtype=torch.bfloat16 if bf16 else torch.float16,
        profile=profile,
        memory_cap_bytes=0,  # set once primed
        host_timer=host_timer,
    )


def _prime(device: ProbeDevice) -> None:
    small = torch.ones(64, 64, dtype=device.gemm_dtype, device=device.torch_device)
    torch.mm(small, small)
    device.synchronize()


# ---- GEMM ------------------------------------------------------------------------------


def _gemm_operands(device: ProbeDevice, n: int) -> Callable[[], object]:
    generator = torch.Generator(device=device.torch_device).manual_seed(0)
    a, b = (
        torch.randn(n, n, generator=generator, device=device.torch_device).to(device.gemm_dtype)
        for _ in range(2)
    )
    c = torch.empty(n, n, dtype=device.gemm_dtype, device=device.torch_device)
    return lambda: torch.mm(a, b, out=c)


def _largest_gemm(device: ProbeDevice) -> int:
    itemsize = torch.empty((), dtype=device.gemm_dtype).element_size()
    # Three n x n operands, plus the fp32 staging of one while it is generated.
    fits = int((device.memory_cap_bytes / (3 * itemsize + 4)) ** 0.5)
    step = device.profile.gemm_size_step
    largest = min(device.profile.gemm_max_size, fits // step * step)
    if largest < step:
        raise ProbeUnavailableError(f"too little free memory on {device.label} for a GEMM probe")
    return largest


def calibrate_gemm(device: ProbeDevice) -> int:
    """The matrix side whose GEMM takes about the profile's iteration time on ``device``."""
    profile = device.profile
    start = min(profile.gemm_start_size, _largest_gemm(device))
    step = _gemm_operands(device, start)
    device.device_time(step)  # the first call picks a kernel and starts threads
    seconds = device.device_time(step)
    # GEMM time grows with the cube of the side.
    scaled: float = start * (profile.gemm_iteration_s / seconds) ** (1 / 3)
    rounded = round(scaled / profile.gemm_size_step) * profile.gemm_size_step
    return max(profile.gemm_size_step, min(rounded, _largest_gemm(device)))


def gemm_probe(
    device: ProbeDevice, size: int | None = None, clock: Clock = time.perf_counter
) -> ProbeMeasurement:
    """Achieved matmul rate (TFLOP/s) of an ``size`` x ``size`` GEMM; calibrates if None."""
    started = clock()
    n = min(size or calibrate_gemm(device), _largest_gemm(device))
    step = _gemm_operands(device, n)
    device.device_time(step)  # warm-up at this size
    repeats = repeat_until_confident(
        lambda: device.device_time(step), device.profile.gemm_policy, clock
    )
    rate = 2 * n**3 / repeats.median_s / 1e12
    return _measurement(
        device, ProbeKind.GEMM, device.precision, n, rate, clock() - started, repeats
    )


# ---- bandwidth -------------------------------------------------------------------------


def _copy_buffers(device: ProbeDevice, nbytes: int) -> Callable[[], object]:
    # Filled, not just allocated: reading never-touched pages maps the kernel's zero page
    # on a CPU, which stays in cache and would inflate the rate.
    source = torch.ones(nbytes, dtype=torch.uint8, device=device.torch_device)
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device.torch_device)
    return lambda: target.copy_(source)


def _largest_buffer(device: ProbeDevice) -> int:
    largest = min(device.profile.max_buffer_bytes, device.memory_cap_bytes // 2) // MIB * MIB
    if largest < device.profile.min_buffer_bytes:
        raise ProbeUnavailableError(f"too little free memory on {device.label} for a copy probe")
    return largest


def calibrate_bandwidth(device: ProbeDevice) -> int:
    """Bytes per buffer whose copy takes about the profile's iteration time on ``device``."""
    profile = device.profile
    start = profile.min_buffer_bytes
    _largest_buffer(device)  # fail early when even the smallest buffer does not fit
    copy = _copy_buffers(device, start)
    device.device_time(copy)
    seconds = device.device_time(copy)
    scaled = int(start * profile.bandwidth_iteration_s / seconds) // MIB * MIB
    return max(start, min(scaled, _largest_buffer(device)))


def bandwidth_probe(
    device: ProbeDevice, size: int | None = None, clock: Clock = time.perf_counter
) -> ProbeMeasurement:
    """Achieved copy bandwidth (GB/s, read + write) between two ``size``-byte buffers."""
    started = clock()
    nbytes = min(size or calibrate_bandwidth(device), _largest_buffer(device))
    copy = _copy_buffers(device, nbytes)
    device.device_time(copy)
    repeats = repeat_until_confident(
        lambda: device.device_time(copy), device.profile.bandwidth_policy, clock
    )
    rate = 2 * nbytes / repeats.median_s / 1e9
    return _measurement(device, ProbeKind.BANDWIDTH, "", nbytes, rate, clock() - started, repeats)


# ---- launch latency --------------------------------------------------------------------


def _launch_round_trips(device: ProbeDevice) -> Callable[[], float]:
    """A timing of ``latency_batch`` tiny launches, each waited for; seconds per launch."""
    scalar = torch.zeros(1, device=device.torch_device)
    batch = device.profile.latency_batch

    def time_batch() -> float:
        started = device.host_timer()
        for _ in range(batch):
            scalar.add_(1.0)
            device.synchronize()
        return max((device.host_timer() - started) / batch, _MIN_TIME_S)

    time_batch()  # warm-up: the first launch loads the kernel
    return time_batch


def launch_latency_probe(device: ProbeDevice, clock: Clock = time.perf_counter) -> ProbeMeasurement:
    """Round-trip time of one tiny kernel launch (microseconds; lower is better)."""
    started = clock()
    repeats = repeat_until_confident(
        _launch_round_trips(device), device.profile.latency_policy, clock
    )
    latency_us = repeats.median_s * 1e6
    return _measurement(
        device, ProbeKind.LAUNCH_LATENCY, "", 0, latency_us, clock() - started, repeats
    )


# ---- dispatch and long reference runs --------------------------------------------------


def run_probe(kind: ProbeKind, device: ProbeDevice, size: int | None = None) -> ProbeMeasurement:
    """Run one probe of ``kind``; ``size`` is an earlier round's size (None: calibrate)."""
    if kind is ProbeKind.GEMM:
        return gemm_probe(device, size)
    if kind is ProbeKind.BANDWIDTH:
        return bandwidth_probe(device, size)
    return launch_latency_probe(device)


def sustained_rate(
    kind: ProbeKind,
    device: ProbeDevice,
    size: int,
    seconds: float,
    clock: Clock = time.perf_counter,
) -> float:
    """The rate of a long back-to-back run of the same kernel at the same size.

    This is the device's sustained limit a short probe is judged against, in the probe's
    unit (for launch latency: the median microseconds per launch over the long run). The
    rate is taken from the median iteration, as a probe's is: on a shared host, other
    processes that preempt some iterations then stay out of the device's limit, while a
    device that slows down for good (clocks, heat) slows most iterations and lowers it.
    """
    if kind is ProbeKind.LAUNCH_LATENCY:
        time_batch = _launch_round_trips(device)
        started = clock()
        timings: list[float] = []
        while clock() - started < seconds:
            timings.append(time_batch())
        return statistics.median(timings) * 1e6
    step = _gemm_operands(device, size) if kind is ProbeKind.GEMM else _copy_buffers(device, size)
    work = 2 * size**3 / 1e12 if kind is ProbeKind.GEMM else 2 * size / 1e9
    device.device_time(step)
    chunk = 8  # iterations per host wait on a GPU: the device stays busy
    started = clock()
    iteration_s: list[float] = []
    while clock() - started < seconds or len(iteration_s) < _MIN_ITERATIONS:
        iteration_s += device.device_times(step, chunk)
    return work / statistics.median(iteration_s)


def _measurement(
    device: ProbeDevice,
    kind: ProbeKind,
    precision: str,
    size: int,
    rate: float,
    duration_s: float,
    repeats: Repeats,
) -> ProbeMeasurement:
    return ProbeMeasurement(
        gpu_index=device.gpu_index,
        kind=kind,
        device=device.label,
        device_kind="cuda" if device.is_cuda else "cpu",
        precision=precision,
        size=size,
        rate=rate,
        unit=UNITS[kind],
        duration_s=duration_s,
        repeats=len(repeats.times_s),
        ci95_rel=repeats.ci95_rel,
        confident=repeats.confident,
    )
