"""The probe kernels, run for real on this machine's CPU."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
import torch

from agent.probes.kernels import (
    CPU_PROFILE,
    ProbeDevice,
    ProbeUnavailableError,
    bandwidth_probe,
    calibrate_gemm,
    gemm_probe,
    launch_latency_probe,
    open_device,
    sustained_rate,
)
from agent.probes.measurement import ProbeKind, ProbeMeasurement

REFERENCE_RUN_S = 0.5
# A burst of interrupts can land in the long run and not in the probe (or the reverse). A
# probe that is right reaches the band in one of a few attempts; a wrong one (bad work
# count, timing the wrong thing) misses it every time.
ATTEMPTS = 3


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # One thread, as the worker runs by default: torch then computes on the calling thread.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cpu(one_thread: None) -> ProbeDevice:
    # Timed by this thread's CPU time: other processes running tests on this shared
    # machine would otherwise slow the long run more than the short probe and fail a
    # correct probe. (The worker and the benchmarks time with the wall clock.)
    return open_device("cpu", host_timer=time.thread_time)


@pytest.fixture
def wall_clocked_cpu(one_thread: None) -> ProbeDevice:
    return open_device("cpu")


def assert_plausible(measurement: ProbeMeasurement, kind: ProbeKind) -> None:
    assert measurement.kind is kind
    assert measurement.device == "cpu"
    assert measurement.device_kind == "cpu"
    assert math.isfinite(measurement.rate)
    assert measurement.rate > 0
    assert measurement.repeats >= 3
    assert measurement.duration_s > 0


def within_band(ratio: Callable[[], float]) -> list[float]:
    """Ratios measured until one lands in (0, 1.2]; the list ends with the one that did."""
    ratios: list[float] = []
    while len(ratios) < ATTEMPTS:
        ratios.append(ratio())
        if 0 < ratios[-1] <= 1.2:
            break
    return ratios


def test_auto_without_cuda_is_the_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    device = open_device("auto", gpu_index=3)
    assert device.label == "cpu"
    assert device.gpu_index == 3
    assert device.precision == "fp32"


def test_cuda_demanded_without_cuda_is_refused() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ProbeUnavailableError, match="CUDA"):
        open_device("cuda")


def test_gemm_probe_is_plausible_against_a_long_run(cpu: ProbeDevice) -> None:
    size = calibrate_gemm(cpu)
    assert CPU_PROFILE.gemm_size_step <= size <= CPU_PROFILE.gemm_max_size
    assert size % CPU_PROFILE.gemm_size_step == 0

    def ratio() -> float:
        probes = [gemm_probe(cpu, size) for _ in range(3)]
        for probe in probes:
            assert_plausible(probe, ProbeKind.GEMM)
            assert probe.size == size
            assert probe.unit == "TFLOP/s"
            assert probe.precision == "fp32"
        sustained = sustained_rate(ProbeKind.GEMM, cpu, size, REFERENCE_RUN_S)
        return statistics.median(p.rate for p in probes) / sustained

    ratios = within_band(ratio)
    assert 0 < ratios[-1] <= 1.2, ratios


def test_bandwidth_probe_is_plausible_against_a_long_run(cpu: ProbeDevice) -> None:

    def ratio() -> float:
        probe = bandwidth_probe(cpu)  # calibrates
        assert_plausible(probe, ProbeKind.BANDWIDTH)
        assert probe.size >= CPU_PROFILE.min_buffer_bytes
        assert probe.unit == "GB/s"
        return probe.rate / sustained_rate(ProbeKind.BANDWIDTH, cpu, probe.size, REFERENCE_RUN_S)

    ratios = within_band(ratio)
    assert 0 < ratios[-1] <= 1.2, ratios


def test_launch_latency_is_plausible(cpu: ProbeDevice) -> None:

    def ratio() -> float:
        probe = launch_latency_probe(cpu)
        assert_plausible(probe, ProbeKind.LAUNCH_LATENCY)
        assert probe.unit == "us"
        # Lower is better: the ratio to the limit is sustained latency over probe latency.
        return sustained_rate(ProbeKind.LAUNCH_LATENCY, cpu, 0, 0.2) / probe.rate

    ratios = within_band(ratio)
    assert 0 < ratios[-1] <= 1.2, ratios


def test_a_given_size_is_used_as_is(cpu: ProbeDevice) -> None:
    assert gemm_probe(cpu, 128).size == 128


def test_a_device_without_room_refuses_probes(cpu: ProbeDevice) -> None:
    cramped = replace(cpu, memory_cap_bytes=1024)
    with pytest.raises(ProbeUnavailableError, match="memory"):
        gemm_probe(cramped)
    with pytest.raises(ProbeUnavailableError, match="memory"):
        bandwidth_probe(cramped)


def test_wall_clocked_probes_are_plausible(wall_clocked_cpu: ProbeDevice) -> None:
    assert_plausible(gemm_probe(wall_clocked_cpu), ProbeKind.GEMM)
    assert_plausible(launch_latency_probe(wall_clocked_cpu), ProbeKind.LAUNCH_LATENCY)
