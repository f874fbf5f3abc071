"""Fitting is reproducible and exported exactly; evaluation never fits on what it judges."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from server.classifier import evaluate as evaluate_module
from server.classifier.dataset import WindowRow
from server.classifier.evaluate import (
    LeakageError,
    assert_disjoint,
    leave_one_recording_out,
    summarise,
)
from server.classifier.fit import (
    FitError,
    FitSettings,
    _threshold_for,
    fit_booster,
    fit_model,
    sample_weights,
)
from server.classifier.model import StumpModel, model_from_document
from tests.server.classifier.synthetic_data import synthetic_data

FAST = FitSettings(n_estimators=15, learning_rate=0.3, inner_folds=3)


@pytest.fixture(scope="module")
def rows() -> list[WindowRow]:
    return [row for item in synthetic_data() for row in item.rows]


def test_the_same_rows_and_seed_give_the_same_model(rows: list[WindowRow]) -> None:
    first = fit_model(rows, FAST)
    second = fit_model(rows, FAST)
    assert first.to_document() == second.to_document()
    assert first.model_version.startswith("gpuattest-classifier-v2+")


def test_the_exported_model_predicts_what_scikit_learn_predicts(rows: list[WindowRow]) -> None:
    # fit_model raises FitError on any disagreement; check a few rows here independently.
    from server.classifier.fit import MODEL_FEATURES, design_matrix

    model = fit_model(rows, FAST)
    booster = fit_booster([r for r in rows if r.truth != "mixed"], FAST)
    sample = [r for r in rows if r.truth != "mixed"][:20]
    expected = booster.predict_proba(design_matrix(sample))
    for row, wanted in zip(sample, expected, strict=True):
        got = model.predict({n: row.features[n] for n in MODEL_FEATURES if n in row.features})
        assert got.probabilities == pytest.approx(tuple(wanted), abs=1e-6)


def test_the_document_round_trips(rows: list[WindowRow]) -> None:
    model = fit_model(rows, FAST)
    again = model_from_document(model.to_document())
    assert isinstance(again, StumpModel)
    assert again.to_document() == model.to_document()


def test_a_fit_without_one_class_is_refused(rows: list[WindowRow]) -> None:
    with pytest.raises(FitError, match="training"):
        fit_model([r for r in rows if r.truth != "training"], FAST)


def test_every_recording_weighs_the_same_within_its_class(rows: list[WindowRow]) -> None:
    usable = [r for r in rows if r.truth != "mixed"]
    weights = sample_weights(usable)
    totals: dict[tuple[str, str], float] = {}
    for row, weight in zip(usable, weights, strict=True):
        key = (row.recording, row.truth)
        totals[key] = totals.get(key, 0.0) + float(weight)
    for truth in {t for _, t in totals}:
        values = [v for (_, t), v in totals.items() if t == truth]
        assert max(values) == pytest.approx(min(values))


@pytest.mark.parametrize(
    ("p_training", "expected"),
    [
        ([], 0.5),
        ([0.1] * 100, 0.5),
        ([0.95] + [0.1] * 99, 0.5),  # 1 of 100 is over the 0.5 % allowance: raise past it
        ([0.995, 0.97] + [0.1] * 98, 0.99),  # capped
    ],
    ids=["nothing-held-out", "all-low", "one-high", "capped"],
)
def test_the_threshold_keeps_held_out_false_positives_rare(
    p_training: Sequence[float], expected: float
) -> None:
    threshold = _threshold_for(p_training, FitSettings())
    if p_training and expected == 0.5 and max(p_training) > 0.5:
        assert threshold > max(p_training)
    else:
        assert threshold == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fitted", "evaluated"),
    [
        (["a", "b"], ["b"]),
        (["a", "b@250ms"], ["b"]),
        (["a", "b"], ["b@250ms"]),
    ],
    ids=["same", "resampled-in-fit", "resampled-in-evaluation"],
)
def test_a_recording_on_both_sides_stops_the_evaluation(
    fitted: list[str], evaluated: list[str]
) -> None:
    with pytest.raises(LeakageError, match="b"):
        assert_disjoint(fitted, evaluated)


def test_disjoint_recordings_pass() -> None:
    assert_disjoint(["a", "b@250ms"], ["c", "c@250ms"])


def test_leave_one_out_never_fits_on_the_held_out_recording(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = synthetic_data()
    fitted_on: list[set[str]] = []
    real_fit = fit_model

    def spy(rows: Sequence[WindowRow], settings: FitSettings = FAST) -> StumpModel:
        fitted_on.append({row.recording for row in rows})
        return real_fit(rows, FAST)

    monkeypatch.setattr(evaluate_module, "fit_model", spy)
    evaluation = leave_one_recording_out(data)

    assert [held.name for held in evaluation.native] == [item.name for item in data]
    for held, recordings in zip(evaluation.native, fitted_on, strict=True):
        assert held.name not in recordings
        assert len(recordings) == len(data) - 1
    summary = summarise(evaluation.native)
    assert summary["recordings"] == len(data)
    assert 0.0 <= summary["recording_accuracy"] <= 1.0
