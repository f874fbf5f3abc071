"""`gpuattest bench`: the report it builds from pytest-benchmark, and the command itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gpuattest.bench import BenchRow, bench, results_document, row_from_benchmark

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_FIELDS = {
    "name", "device", "median_s", "rate", "unit", "limit_rate", "ratio", "target", "passed",
}  # fmt: skip
TOY_SUITE = """
from benchmarks.conftest import BenchResult, record


def test_described(benchmark):
    benchmark(sum, range(10))
    record(
        benchmark,
        BenchResult("toy.sum", "cpu", 4.0, "sums/s", limit_rate=8.0, ratio=0.5,
                    target="ratio >= 0.9", passed=False),
    )


def test_plain(benchmark):
    benchmark(len, "abc")
"""


def benchmark_entry(name: str, median: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "stats": {"median": median}, "extra_info": extra}


def test_a_described_benchmark_keeps_its_own_figures() -> None:
    result = {
        "name": "probe.gemm", "device": "cpu fp32", "rate": 0.15, "unit": "TFLOP/s",
        "limit_rate": 0.16, "ratio": 0.9375, "target": "ratio >= 0.85", "passed": True,
    }  # fmt: skip
    row = row_from_benchmark(benchmark_entry("test_probe_gemm", 0.012, {"result": result}))
    assert row == BenchRow("probe.gemm", "cpu fp32", 0.012, 0.15, "TFLOP/s", 0.16, 0.9375,
                           "ratio >= 0.85", True)  # fmt: skip


def test_an_undescribed_benchmark_is_reported_as_calls_per_second() -> None:
    row = row_from_benchmark(benchmark_entry("test_x", 0.5, {"device": "cpu"}))
    assert (row.name, row.rate, row.unit, row.passed, row.ratio) == (
        "test_x",
        2.0,
        "calls/s",
        None,
        None,
    )


def test_the_json_document_has_exactly_the_issue_schema() -> None:
    rows = [BenchRow("a", "cpu", 0.1, math.nan, "x/s", None, math.inf, "report only", None)]
    document = results_document({"cpu_count": 2}, rows)
    text = json.dumps(document, allow_nan=False)  # would raise on NaN or inf
    (result,) = json.loads(text)["results"]
    assert set(result) == RESULT_FIELDS
    assert result["rate"] is None
    assert result["ratio"] is None


def test_a_missing_suite_is_a_clear_error(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(bench, ["--suite", str(tmp_path / "nowhere")])
    assert outcome.exit_code != 0
    assert "no benchmark suite" in outcome.output


def test_bench_runs_a_suite_and_writes_the_json(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_toy_bench.py").write_text(TOY_SUITE)
    output, raw = tmp_path / "results.json", tmp_path / "raw.json"
    completed = subprocess.run(
        [sys.executable, "-m", "gpuattest", "bench", "--suite", str(suite), "--json", str(output),
         "--raw", str(raw), "--check"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stdout + completed.stderr  # a target was missed
    assert "toy.sum" in completed.stdout
    assert "FAIL" in completed.stdout
    document = json.loads(output.read_text())
    assert set(document) == {"machine", "results"}
    machine = document["machine"]
    assert {"device", "driver", "torch_version", "cpu_count"} <= set(machine)
    assert machine["cpu_count"] >= 1
    by_name = {result["name"]: result for result in document["results"]}
    assert set(by_name) == {"toy.sum", "test_plain"}
    for result in by_name.values():
        assert set(result) == RESULT_FIELDS
        assert result["median_s"] > 0
    assert by_name["toy.sum"]["passed"] is False
    assert by_name["toy.sum"]["ratio"] == 0.5
    assert by_name["test_plain"]["unit"] == "calls/s"
    raw_names = [entry["name"] for entry in json.loads(raw.read_text())["benchmarks"]]
    assert sorted(raw_names) == ["test_described", "test_plain"]


@pytest.mark.parametrize("flag", ["--json", "--suite"], ids=["json-needs-path", "suite-needs-path"])
def test_options_that_need_a_value_refuse_none(flag: str) -> None:
    outcome = CliRunner().invoke(bench, [flag])
    assert outcome.exit_code == 2
