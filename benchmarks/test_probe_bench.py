"""The probe kernels on whatever device is here, against a long run of the same kernel.

A probe is benchmarked at the size its first (calibrating) round chose, as the daemon runs
it from the second round on; the first round's duration is kept in the extra info. The
limit is the sustained rate of the same kernel at the same size run back to back for
``budget.reference_s`` seconds on the same device, once before and once after the probes;
the better run counts, since other work on a shared machine can only make a run look
slower than the device is (a limit measured too low would flatter the probe). torch runs
with one intra-op thread, as the probe worker does by default: on this project's 2-core
machine a second thread would compete with the rest of the suite and with other work.
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Callable, Iterator

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from agent.probes.kernels import (
    ProbeDevice,
    bandwidth_probe,
    calibrate_bandwidth,
    calibrate_gemm,
    gemm_probe,
    launch_latency_probe,
    open_device,
    sustained_rate,
)
from agent.probes.measurement import ProbeKind, ProbeMeasurement
from agent.probes.runner import ProbeTarget, WorkerRequest, run_worker
from benchmarks.conftest import BenchResult, Budget, median_s, record

TORCH_THREADS = 1
GEMM_MIN_RATIO = 0.85
BANDWIDTH_MIN_RATIO = 0.80
# The bound on this CPU; on an H100 the same probe should need ~1 ms (allowing 2).
GEMM_MAX_MEDIAN_S = {"cpu": 0.020, "cuda": 0.002}


@pytest.fixture(scope="module")
def device() -> Iterator[ProbeDevice]:
    """CUDA device 0 when present, else the CPU; torch pinned to one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield open_device("auto")
    torch.set_num_threads(previous)


def _device_kind(device: ProbeDevice) -> str:
    return "cuda" if device.is_cuda else "cpu"


def _run_probes(
    benchmark: BenchmarkFixture, probe: ProbeMeasurement, run: Callable[[], ProbeMeasurement]
) -> list[ProbeMeasurement]:
    """Benchmark ``run``; the extra info keeps the calibrating first round's figures."""
    measured: list[ProbeMeasurement] = []

    def once() -> None:
        measured.append(run())

    benchmark(once)
    benchmark.extra_info.update(
        size=probe.size,
        first_round_s=probe.duration_s,
        torch_threads=torch.get_num_threads(),
        ci95_rel_median=statistics.median(m.ci95_rel for m in measured),
    )
    return measured


def test_probe_gemm(benchmark: BenchmarkFixture, device: ProbeDevice, budget: Budget) -> None:
    first = gemm_probe(device, calibrate_gemm(device))
    before = sustained_rate(ProbeKind.GEMM, device, first.size, budget.reference_s)
    measured = _run_probes(benchmark, first, lambda: gemm_probe(device, first.size))
    rate = statistics.median(m.rate for m in measured)
    after = sustained_rate(ProbeKind.GEMM, device, first.size, budget.reference_s)
    limit = max(before, after)
    ratio = rate / limit
    longest = GEMM_MAX_MEDIAN_S[_device_kind(device)]
    median = median_s(benchmark)
    record(
        benchmark,
        BenchResult(
            name="probe.gemm",
            device=f"{device.label} {device.precision}",
            rate=rate,
            unit="TFLOP/s",
            limit_rate=limit,
            ratio=ratio,
            target=f"ratio >= {GEMM_MIN_RATIO}, median <= {longest * 1e3:g} ms",
            passed=None if median is None else ratio >= GEMM_MIN_RATIO and median <= longest,
        ),
    )


def test_probe_bandwidth(benchmark: BenchmarkFixture, device: ProbeDevice, budget: Budget) -> None:
    first = bandwidth_probe(device, calibrate_bandwidth(device))
    before = sustained_rate(ProbeKind.BANDWIDTH, device, first.size, budget.reference_s)
    measured = _run_probes(benchmark, first, lambda: bandwidth_probe(device, first.size))
    rate = statistics.median(m.rate for m in measured)
    after = sustained_rate(ProbeKind.BANDWIDTH, device, first.size, budget.reference_s)
    limit = max(before, after)
    ratio = rate / limit
    record(
        benchmark,
        BenchResult(
            name="probe.bandwidth",
            device=device.label,
            rate=rate,
            unit="GB/s",
            limit_rate=limit,
            ratio=ratio,
            target=f"ratio >= {BANDWIDTH_MIN_RATIO}",
            passed=None if median_s(benchmark) is None else ratio >= BANDWIDTH_MIN_RATIO,
        ),
    )


def test_probe_launch_latency(
    benchmark: BenchmarkFixture, device: ProbeDevice, budget: Budget
) -> None:
    first = launch_latency_probe(device)
    before = sustained_rate(ProbeKind.LAUNCH_LATENCY, device, 0, budget.reference_s)
    measured = _run_probes(benchmark, first, lambda: launch_latency_probe(device))
    latency_us = statistics.median(m.rate for m in measured)
    after = sustained_rate(ProbeKind.LAUNCH_LATENCY, device, 0, budget.reference_s)
    limit_us = min(before, after)  # lower is better
    record(
        benchmark,
        BenchResult(
            name="probe.launch_latency",
            device=device.label,
            rate=latency_us,
            unit="us",
            limit_rate=limit_us,
            # Lower is better: the ratio to the limit is sustained over probed latency.
            ratio=limit_us / latency_us,
        ),
    )


def test_probe_worker_round(benchmark: BenchmarkFixture, budget: Budget) -> None:
    """A whole worker round as the daemon pays for it: spawn, import torch, probe, exit."""
    request = WorkerRequest(device="auto", targets=(ProbeTarget(gpu_index=0),))
    cpu_s: list[float] = []
    devices: list[str] = []

    def round_trip() -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = run_worker(request)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        devices.append(report.measurements[0].device)

    # pytest-benchmark leaves pedantic() unannotated.
    benchmark.pedantic(round_trip, rounds=budget.rounds, iterations=1)  # type: ignore[no-untyped-call]
    benchmark.extra_info["note"] = "rate: CPU seconds the worker process used per round"
    record(
        benchmark,
        BenchResult(
            name="probe.worker_round",
            device=devices[0],
            rate=statistics.median(cpu_s),
            unit="CPU s/round",
        ),
    )
