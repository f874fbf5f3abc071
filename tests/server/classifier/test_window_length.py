"""A model is valid for one window length: fitted for it, recorded in the JSON, enforced on use."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from agent.collectors.synthetic import TRACE_KINDS, generate_trace, write_synthetic_trace
from agent.settings import AgentSettings
from gpuattest.cli import cli
from server.classifier.aggregate import WindowVerdict, recording_verdict
from server.classifier.dataset import WindowRow, rebased
from server.classifier.evaluate import load_data
from server.classifier.fit import FitError, FitSettings, fit_model, window_length_s
from server.classifier.model import (
    DEFAULT_WINDOW_S,
    ModelFormatError,
    StepFunction,
    StumpModel,
    WindowLengthError,
    load_model,
    load_packaged_model,
    model_from_document,
    write_model,
)
from server.classifier.offline import classify_ticks
from tests.server.classifier.synthetic_data import synthetic_data

FAST = FitSettings(n_estimators=15, learning_rate=0.3, inner_folds=3)


def tiny_model(window_s: float = DEFAULT_WINDOW_S) -> StumpModel:
    """busy_frac above 0.5 pushes to training, below to idle."""
    step = StepFunction("busy_frac", (0.5,), ((4.0, 0.0, 0.0), (0.0, 0.0, 4.0)), (0.0,) * 3)
    return StumpModel("tiny-v0", (0.0, 0.0, 0.0), (step,), 0.9, window_s=window_s)


# --- the model document ------------------------------------------------------------------------


def test_the_packaged_model_is_for_the_agents_default_windows() -> None:
    # Changing the agent's default without refitting would leave the verifier judging
    # windows with a model fitted for another length.
    agent_default = AgentSettings.model_fields["window_s"].default
    assert load_packaged_model().window_s == agent_default == DEFAULT_WINDOW_S


def test_a_document_without_window_s_was_fitted_on_10_s_windows() -> None:
    document = tiny_model(5.0).to_document()
    del document["window_s"]
    assert model_from_document(document).window_s == 10.0


def test_window_s_survives_writing_and_loading(tmp_path: Path) -> None:
    loaded = load_model(write_model(tiny_model(5.0), tmp_path / "m.json"))
    assert loaded.window_s == 5.0
    assert json.loads((tmp_path / "m.json").read_text())["window_s"] == 5.0


def _with_window(value: Any) -> dict[str, Any]:
    document = copy.deepcopy(tiny_model().to_document())
    document["window_s"] = value
    return document


@pytest.mark.parametrize(
    "value",
    [0.0, -5.0, "5", True, None, math.inf],
    ids=["zero", "negative", "string", "bool", "null", "infinite"],
)
def test_a_malformed_window_s_is_refused(value: Any) -> None:
    with pytest.raises(ModelFormatError, match="window_s"):
        model_from_document(_with_window(value))


# --- refusing other windows ---------------------------------------------------------------------


@given(st.floats(min_value=-1e-4, max_value=1e-4))
def test_nanosecond_rounding_of_window_edges_is_the_same_length(offset: float) -> None:
    tiny_model(5.0).check_window_s(5.0 + offset)


@pytest.mark.parametrize(
    ("model_s", "window_s"),
    [(10.0, 5.0), (5.0, 10.0), (5.0, 7.5), (10.0, 9.9), (10.0, math.nan), (10.0, math.inf)],
    ids=["5s-into-10s", "10s-into-5s", "7.5s-into-5s", "just-short", "nan", "infinite"],
)
def test_windows_of_another_length_are_refused(model_s: float, window_s: float) -> None:
    with pytest.raises(WindowLengthError, match="fitted on"):
        tiny_model(model_s).check_window_s(window_s)


def test_offline_classification_cuts_windows_of_the_models_length() -> None:
    ticks = rebased(generate_trace("training", 3, gpus=1, seconds=20.0, interval_s=0.25))
    classified = classify_ticks(ticks, tiny_model(5.0), [0])
    # The last window ends at the last sample (19.75 s), so compare where windows start.
    assert [w.verdict.start_s for w in classified.windows] == [0.0, 5.0, 10.0, 15.0]


def test_offline_classification_refuses_another_window_length() -> None:
    ticks = rebased(generate_trace("training", 3, gpus=1, seconds=20.0, interval_s=0.25))
    with pytest.raises(WindowLengthError):
        classify_ticks(ticks, tiny_model(5.0), [0], window_s=10.0)


# --- fitting records what it was fitted on ---------------------------------------------------


def _row(start_s: float, end_s: float) -> WindowRow:
    return WindowRow("r", 0, start_s, end_s, {"busy_frac": 1.0}, "training", "training")


@pytest.mark.parametrize(
    "rows",
    [[], [_row(0.0, 10.0), _row(10.0, 15.0)]],
    ids=["no-rows", "mixed-lengths"],
)
def test_rows_without_one_window_length_are_refused(rows: list[WindowRow]) -> None:
    with pytest.raises(FitError, match="window length"):
        window_length_s(rows)


def test_float_sums_of_window_edges_are_one_length() -> None:
    # 0.1 * 3 and friends: edges k * window_s are not exact in binary floating point.
    rows = [_row(k * 0.1 * 50, (k + 1) * 0.1 * 50) for k in range(7)]
    assert window_length_s(rows) == 5.0


def test_a_fit_on_5_s_windows_says_so() -> None:
    rows = [row for item in synthetic_data(window_s=5.0) for row in item.rows]
    model = fit_model(rows, FAST)
    assert model.window_s == 5.0
    assert model_from_document(model.to_document()).window_s == 5.0


# --- hysteresis stays two windows, whatever their length ------------------------------------


def _verdicts(labels: str, window_s: float) -> list[WindowVerdict]:
    names = {"T": "training", "I": "inference"}
    return [
        WindowVerdict(0, k * window_s, (k + 1) * window_s, names[c], 0.5, 0.9)
        for k, c in enumerate(labels)
    ]


@pytest.mark.parametrize("window_s", [5.0, 7.5, 10.0], ids=["5s", "7.5s", "10s"])
@pytest.mark.parametrize(
    ("labels", "alarm_after_windows"),
    [("ITIIITI", None), ("IITTI", 4), ("TT", 2)],
    ids=["odd-windows-alone", "a-pair", "from-the-start"],
)
def test_an_alarm_needs_two_consecutive_windows_of_any_length(
    window_s: float, labels: str, alarm_after_windows: int | None
) -> None:
    result = recording_verdict(_verdicts(labels, window_s))
    if alarm_after_windows is None:
        assert result.first_training_s is None
    else:
        assert result.first_training_s == pytest.approx(alarm_after_windows * window_s)


# --- the commands ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic data folder shaped like ../shared/data/telemetry (no LABELS.csv)."""
    root = tmp_path_factory.mktemp("synthetic-telemetry")
    for kind in TRACE_KINDS:
        folder = root / ("training" if kind == "training" else "inference")
        folder.mkdir(exist_ok=True)
        for seed in (1, 2, 3):
            write_synthetic_trace(
                folder / f"synthetic-{kind}-{seed}.csv", kind, seed, gpus=1, seconds=30.0
            )
    return root


def test_evaluation_data_is_cut_into_the_asked_windows(data_dir: Path) -> None:
    data, copies = load_data(data_dir, window_s=5.0)
    rows = [row for item in [*data, *copies.values()] for row in item.rows]
    assert len(data) == 9
    assert {round(row.end_s - row.start_s, 6) for row in rows} == {5.0}


def test_fit_and_classify_commands_carry_the_window_length(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-5s.json"
    fitted = CliRunner().invoke(
        cli, ["classifier", "fit", str(data_dir), "--out", str(out), "--window-s", "5"]
    )
    assert fitted.exit_code == 0, fitted.output
    assert load_model(out).window_s == 5.0

    trace = next((data_dir / "training").iterdir())
    result = CliRunner().invoke(cli, ["classify", str(trace), "--model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    windows = json.loads(result.stdout)["recordings"][0]["windows"]
    assert {round(w["end_s"] - w["start_s"], 6) for w in windows[:-1]} == {5.0}


@pytest.mark.parametrize(
    "window_s", ["0", "-5", "10.5", "nan"], ids=["zero", "negative", "over-10", "nan"]
)
def test_the_commands_refuse_impossible_window_lengths(
    data_dir: Path, tmp_path: Path, window_s: str
) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "classifier",
            "fit",
            str(data_dir),
            "--out",
            str(tmp_path / "m.json"),
            "--window-s",
            window_s,
        ],
    )
    assert result.exit_code == 2
    assert "--window-s" in result.output
