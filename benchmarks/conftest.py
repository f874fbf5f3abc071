"""Shared machinery of the benchmark suite: run it with ``gpuattest bench`` or ``make bench``.

Every benchmark records one result in ``benchmark.extra_info["result"]`` (see
:class:`BenchResult`): the name release checks look for, the device, the achieved rate and
its unit, the limit it is compared with and the ratio, the target and whether it passed.
``gpuattest bench`` adds pytest-benchmark's median and prints the table.

``--gpuattest-quick`` shrinks the slow parts (long reference runs, replayed traces, agent
runs) so the whole suite fits in under two minutes on a 2-core machine; figures are then
rougher. Benchmarks are kept out of the unit tests: pytest's default options disable them
and ``testpaths`` does not include this folder.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

QUICK_OPTION = "--gpuattest-quick"
RESULT_KEY = "result"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the quick-suite switch."""
    parser.addoption(
        QUICK_OPTION,
        action="store_true",
        default=False,
        help="gpuattest: short fixed budgets (whole suite under two minutes)",
    )


@dataclass(frozen=True)
class Budget:
    """How long the slow parts of the suite may run."""

    quick: bool
    reference_s: float  # each long reference run of a probe kernel
    trace_s: float  # replayed trace length for the agent's CPU cost
    agent_run_s: float  # wall time of each real agent process in the RSS benchmark
    rounds: int  # rounds of the benchmarks that time whole slow operations


FULL = Budget(quick=False, reference_s=3.0, trace_s=600.0, agent_run_s=20.0, rounds=5)
QUICK = Budget(quick=True, reference_s=0.5, trace_s=120.0, agent_run_s=8.0, rounds=2)


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> Budget:
    """The full or the quick budget, from ``--gpuattest-quick``."""
    return QUICK if request.config.getoption(QUICK_OPTION) else FULL


@dataclass(frozen=True)
class BenchResult:
    """One line of the benchmark table (median_s comes from pytest-benchmark's stats)."""

    name: str
    device: str
    rate: float
    unit: str
    limit_rate: float | None = None
    ratio: float | None = None
    target: str = "report only"
    passed: bool | None = None


def median_s(benchmark: BenchmarkFixture) -> float | None:
    """pytest-benchmark's median time per round, or None when benchmarks are disabled."""
    metadata = benchmark.stats
    return None if metadata is None else float(metadata.stats.median)


def record(benchmark: BenchmarkFixture, result: BenchResult) -> None:
    """Attach ``result`` to the benchmark's extra info, where ``gpuattest bench`` reads it."""
    benchmark.extra_info[RESULT_KEY] = asdict(result)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture
def device_info() -> dict[str, str]:
    """What CPU-only figures were measured on."""
    return {"device": "cpu", "cpu": cpu_name()}
