"""`gpuattest classify`: the JSON contract, the table, and one-line errors per bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.collectors.synthetic import write_synthetic_trace
from gpuattest.cli import cli


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("traces")
    return {
        kind: write_synthetic_trace(
            folder / f"synthetic-{kind}.csv", kind, seed=5, gpus=2, seconds=40.0
        )
        for kind in ("training", "inference", "idle")
    }


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["classify", *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_output_follows_the_contract_exactly(traces: dict[str, Path]) -> None:
    status, out, _ = run(*(str(p) for p in traces.values()), "--json")
    assert status == 0
    document = json.loads(out)
    assert set(document) == {"model_version", "recordings"}
    assert document["model_version"].startswith("gpuattest-classifier-v")
    assert [r["path"] for r in document["recordings"]] == [str(p) for p in traces.values()]
    for recording in document["recordings"]:
        assert set(recording) == {
            "path", "verdict", "confidence", "gpus", "first_training_s", "windows",
        }  # fmt: skip
        assert recording["verdict"] in ("training", "inference", "idle")
        assert 0.0 <= recording["confidence"] <= 1.0
        assert recording["gpus"] == 2
        assert len(recording["windows"]) == 2 * 4  # 2 GPUs x 4 windows of 10 s
        for window in recording["windows"]:
            assert set(window) == {"gpu", "start_s", "end_s", "label", "p_training"}
            assert 0.0 <= window["start_s"] < window["end_s"] <= 40.0
            assert 0.0 <= window["p_training"] <= 1.0
        first = recording["first_training_s"]
        assert (first is not None) == (recording["verdict"] == "training")


def test_an_idle_trace_is_idle(traces: dict[str, Path]) -> None:
    _, out, _ = run(str(traces["idle"]), "--json")
    assert json.loads(out)["recordings"][0]["verdict"] == "idle"


def test_bad_files_get_one_line_each_and_a_failing_status(
    traces: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("timestamp, power.draw [W], utilization.gpu [%]\n")
    missing = tmp_path / "missing.csv"
    status, out, err = run(
        str(empty), str(traces["idle"]), str(missing), str(header_only), "--json"
    )

    assert status == 1
    assert [r["path"] for r in json.loads(out)["recordings"]] == [str(traces["idle"])]
    lines = err.strip().splitlines()
    assert len(lines) == 3
    for bad, line in zip((empty, missing, header_only), lines, strict=True):
        assert line.startswith(f"gpuattest classify: {bad}:")


def test_the_table_names_the_verdict_per_file(traces: dict[str, Path]) -> None:
    status, out, _ = run(str(traces["training"]))
    assert status == 0
    assert str(traces["training"]) in out
    assert "verdict" in out
    assert "compute" in out
    assert "model gpuattest-classifier-v" in out


def test_a_model_file_can_be_given(traces: dict[str, Path], tmp_path: Path) -> None:
    bad_model = tmp_path / "model.json"
    bad_model.write_text("{}")
    result = CliRunner().invoke(cli, ["classify", str(traces["idle"]), "--model", str(bad_model)])
    assert result.exit_code != 0
