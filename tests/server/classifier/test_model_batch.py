"""Batch prediction (all GPU windows of an envelope at once) gives exactly what predict gives."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.classifier.model import StepFunction, StumpModel, load_packaged_model

PACKAGED = load_packaged_model()


def two_feature_model() -> StumpModel:
    """Features with different numbers of thresholds, so the padded tables matter."""
    busy = StepFunction(
        "busy_frac", (0.25, 0.5, 0.75), ((3, 0, 0), (1, 1, 0), (0, 1, 1), (0, 0, 3)), (0, 0, 0)
    )
    power = StepFunction("power_mean_w", (100.0,), ((1, 0, 0), (0, 0, 1)), (0.5, 0.5, 0.5))
    return StumpModel("two-v0", (0.1, -0.2, 0.3), (busy, power), 0.6)


def assert_same(model: StumpModel, rows: list[dict[str, float]]) -> None:
    """Labels, confidences and probabilities equal bit for bit, row by row."""
    assert model.predict_many(rows) == [model.predict(row) for row in rows]
    assert model.classify_many(rows) == [model.classify(row) for row in rows]


EDGE_ROWS = [
    pytest.param({"busy_frac": 0.5}, id="equal-to-a-threshold-takes-the-lower-interval"),
    pytest.param({"busy_frac": 0.50000001}, id="rounded-to-float32-onto-the-threshold"),
    pytest.param({"busy_frac": math.nan, "power_mean_w": 50.0}, id="nan-is-missing"),
    pytest.param({"busy_frac": math.inf}, id="infinity-is-missing"),
    pytest.param({"power_mean_w": 1e300}, id="beyond-float32-is-the-last-interval"),
    pytest.param({"power_mean_w": -1e300}, id="beyond-float32-below-is-the-first-interval"),
    pytest.param({"other_pct": 3.0}, id="no-model-feature-is-no-evidence"),
    pytest.param({}, id="empty-window"),
]


@pytest.mark.parametrize("row", EDGE_ROWS)
def test_edge_values_score_as_predict_scores_them(row: dict[str, float]) -> None:
    assert_same(two_feature_model(), [row, {"busy_frac": 0.9, "power_mean_w": 120.0}, row])


def test_no_rows_give_no_predictions() -> None:
    assert PACKAGED.predict_many([]) == []


def test_a_model_without_features_gives_no_evidence_everywhere() -> None:
    empty = StumpModel("empty-v0", (0.0, 0.0, 0.0), (), 0.9)
    assert_same(empty, [{"busy_frac": 1.0}, {}])


values = st.floats(allow_nan=True, allow_infinity=True, width=64)
row_of_packaged_features = st.dictionaries(
    st.sampled_from([*PACKAGED.feature_names, "not_a_model_feature_pct"]), values
)


@settings(max_examples=200, deadline=None)
@given(st.lists(row_of_packaged_features, min_size=1, max_size=9))
def test_the_packaged_model_scores_any_windows_as_predict_does(
    rows: list[dict[str, float]],
) -> None:
    assert_same(PACKAGED, rows)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({}, optional={"busy_frac": values, "power_mean_w": values}),
        min_size=1,
        max_size=9,
    )
)
def test_a_padded_model_scores_any_windows_as_predict_does(rows: list[dict[str, float]]) -> None:
    assert_same(two_feature_model(), rows)
