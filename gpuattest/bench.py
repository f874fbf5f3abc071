"""`gpuattest bench`: run the benchmark suite and report it against the targets.

The suite in ``benchmarks/`` is a pytest-benchmark suite. This command runs it in-process
with benchmarks enabled, shows a progress bar, then prints one table row per benchmark
(name, device, median, rate, ratio to its limit, target, pass/fail) and, with ``--json``,
writes::

    {"machine": {...}, "results": [{"name", "device", "median_s", "rate", "unit",
                                    "limit_rate", "ratio", "target", "passed"}, ...]}

Benchmarks describe themselves through ``benchmark.extra_info["result"]`` (see
``benchmarks/conftest.py``); one that does not is reported by its test name, as calls/s.
pytest and pytest-benchmark are development dependencies: they are imported only here,
when the command runs, never by the agent or the verifier.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SUITE = REPO_ROOT / "benchmarks"
RESULT_KEY = "result"  # where benchmarks put their result (benchmarks/conftest.py)
QUICK_ARGS = (
    "--gpuattest-quick",
    "--benchmark-max-time=0.25",
    "--benchmark-min-rounds=3",
    "--benchmark-warmup=off",
)
EXIT_FAILED = 1


@dataclass(frozen=True)
class BenchRow:
    """One result, in exactly the shape ``--json`` writes."""

    name: str
    device: str
    median_s: float
    rate: float
    unit: str
    limit_rate: float | None
    ratio: float | None
    target: str
    passed: bool | None


@dataclass
class SuiteRun:
    """What running the suite produced."""

    exit_code: int
    report: dict[str, Any] | None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (test id, report text)


def row_from_benchmark(benchmark: dict[str, Any]) -> BenchRow:
    """A table row from one entry of pytest-benchmark's JSON report."""
    median = float(benchmark["stats"]["median"])
    extra = benchmark.get("extra_info", {})
    result = extra.get(RESULT_KEY)
    if result is None:  # a benchmark that does not describe itself
        return BenchRow(
            name=benchmark["name"],
            device=str(extra.get("device", "cpu")),
            median_s=median,
            rate=1.0 / median if median > 0 else math.inf,
            unit="calls/s",
            limit_rate=None,
            ratio=None,
            target="report only",
            passed=None,
        )
    return BenchRow(
        name=result["name"],
        device=result["device"],
        median_s=median,
        rate=float(result["rate"]),
        unit=result["unit"],
        limit_rate=_optional_float(result.get("limit_rate")),
        ratio=_optional_float(result.get("ratio")),
        target=result.get("target", "report only"),
        passed=result.get("passed"),
    )


def _optional_float(value: object) -> float | None:
    return None if value is None else float(str(value))


def rows_from_report(report: dict[str, Any]) -> list[BenchRow]:
    """Rows for every benchmark in a pytest-benchmark JSON report, in run order."""
    return [row_from_benchmark(benchmark) for benchmark in report.get("benchmarks", [])]


def results_document(machine: dict[str, Any], rows: list[BenchRow]) -> dict[str, Any]:
    """The ``--json`` document; non-finite numbers become null (JSON has no NaN)."""
    return {
        "machine": machine,
        "results": [{key: _json_safe(value) for key, value in asdict(row).items()} for row in rows],
    }


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- machine facts ----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        from agent.collectors.nvml import open_nvml
    except ImportError:
        return None
    collector = open_nvml()
    if collector is None:
        return None
    try:
        return collector.describe_host().driver_version or None
    finally:
        collector.close()


def machine_info(quick: bool) -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "device": gpus[0] if gpus else f"cpu: {_cpu_model()}",
        "gpus": gpus,
        "driver": _nvidia_driver(),
        "cuda": torch.version.cuda,
        "torch_version": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": quick,
    }


# ---- running the suite ------------------------------------------------------------------


class _ProgressPlugin:
    """pytest plugin: a rich progress bar over the collected benchmarks; keeps failures."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._task = progress.add_task("collecting", total=None)
        self.failures: list[tuple[str, str]] = []

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        self._progress.update(self._task, total=len(items), description="benchmarks")

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._progress.update(self._task, description=nodeid.rsplit("::", 1)[-1])

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self.failures.append((report.nodeid, report.longreprtext))
        if report.when == "teardown":
            self._progress.advance(self._task)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.failures.append((report.nodeid or "collection", report.longreprtext))


def run_suite(
    suite: Path, *, quick: bool, keyword: str | None, raw_path: Path | None = None
) -> SuiteRun:
    """Run the benchmarks in ``suite`` in this process; returns pytest-benchmark's report
    (also kept at ``raw_path`` when given: it has every benchmark's extra info)."""
    try:
        import pytest
        import pytest_benchmark  # noqa: F401 - only to fail early with a clear message
    except ImportError as error:
        raise click.ClickException(
            "gpuattest bench needs the development extras: pip install 'gpuattest[dev]'"
        ) from error
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with tempfile.TemporaryDirectory(prefix="gpuattest-bench-") as scratch:
        report_path = raw_path or Path(scratch) / "benchmark.json"
        args = [
            str(suite),
            "--benchmark-enable",
            f"--benchmark-json={report_path}",
            "-p",
            "no:cacheprovider",
            # Our table replaces pytest's output; failures are collected by the plugin. The
            # project's addopts name terminal options (-ra), so they go too.
            "-p",
            "no:terminal",
            "-o",
            "addopts=",
            "--strict-markers",
            *(QUICK_ARGS if quick else ()),
            *(("-k", keyword) if keyword else ()),
        ]
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            plugin = _ProgressPlugin(progress)
            exit_code = int(pytest.main(args, plugins=[plugin]))
        report = json.loads(report_path.read_text()) if report_path.exists() else None
    return SuiteRun(exit_code, report, plugin.failures)


# ---- output -----------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _verdict(passed: bool | None) -> str:
    return {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "-"}[passed]


def render_table(rows: list[BenchRow], machine: dict[str, Any]) -> Any:
    """The results as a rich table."""
    from rich.table import Table

    table = Table(title=f"gpuattest bench on {machine['device']} ({machine['cpu_count']} CPUs)")
    for column in ("name", "device", "median", "rate", "ratio to limit", "target", "pass/fail"):
        table.add_column(column, justify="right" if column in ("median", "rate") else "left")
    for row in rows:
        table.add_row(
            row.name,
            row.device,
            _duration(row.median_s),
            f"{_number(row.rate)} {row.unit}",
            _number(row.ratio),
            row.target,
            _verdict(row.passed),
        )
    return table


@click.command("bench")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="also write the results to this JSON file",
)
@click.option(
    "--raw",
    "raw_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="keep pytest-benchmark's own JSON report (timings and extra info) here",
)
@click.option("--quick", is_flag=True, help="short fixed budgets (about two minutes in all)")
@click.option(
    "--suite",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_SUITE,
    show_default=True,
    help="folder of the benchmark suite",
)
@click.option("-k", "keyword", help="only benchmarks matching this pytest -k expression")
@click.option("--check", is_flag=True, help="exit with status 1 when a target is missed")
def bench(
    json_path: Path | None,
    raw_path: Path | None,
    quick: bool,
    suite: Path,
    keyword: str | None,
    check: bool,
) -> None:
    """Run the benchmark suite and print each result against its target."""
    from rich.console import Console

    if not suite.is_dir():
        raise click.ClickException(f"no benchmark suite at {suite} (run from a source checkout)")
    run = run_suite(suite, quick=quick, keyword=keyword, raw_path=raw_path)
    console = Console(width=max(Console().width, 160))
    for test_id, text in run.failures:
        console.print(f"[red]FAILED[/] {test_id}\n{text}", markup=True, highlight=False)
    rows = rows_from_report(run.report) if run.report else []
    machine = machine_info(quick)
    if rows:
        console.print(render_table(rows, machine))
    if json_path is not None:
        json_path.write_text(json.dumps(results_document(machine, rows), indent=2) + "\n")
        console.print(f"results written to {json_path}")
    missed = check and any(row.passed is False for row in rows)
    if run.exit_code != 0 or not rows or missed:
        sys.exit(EXIT_FAILED)
