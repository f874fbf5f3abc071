"""The JSON model: loading refuses malformed documents, prediction follows the step functions."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.classifier.model import (
    CLASSES,
    ModelFormatError,
    StepFunction,
    StumpModel,
    load_model,
    load_packaged_model,
    model_from_document,
    write_model,
)
from server.classify import Classifier, default_classifier


def tiny_model(threshold: float = 0.9) -> StumpModel:
    """busy_frac above 0.5 pushes to training (+4), below to idle (+4)."""
    step = StepFunction(
        "busy_frac",
        (0.5,),
        ((4.0, 0.0, 0.0), (0.0, 0.0, 4.0)),
        (0.0, 0.0, 0.0),
    )
    return StumpModel("tiny-v0", (0.0, 0.0, 0.0), (step,), threshold)


def test_the_packaged_model_loads_and_is_the_verifier_default() -> None:
    model = load_packaged_model()
    assert model.model_version.startswith("gpuattest-classifier-v")
    classifier: Classifier = default_classifier()
    assert classifier.model_version == model.model_version
    assert 0.5 <= model.training_threshold <= 0.99


def test_a_value_equal_to_a_threshold_takes_the_lower_interval() -> None:
    step = tiny_model().steps[0]
    assert step.contribution(0.5) == (4.0, 0.0, 0.0)
    assert step.contribution(0.5000001) == (0.0, 0.0, 4.0)
    assert step.contribution(None) == step.missing == step.contribution(math.nan)


def test_probabilities_are_a_softmax_of_the_summed_logits() -> None:
    prediction = tiny_model().predict({"busy_frac": 1.0})
    e4 = math.exp(4.0)
    assert prediction.probabilities == pytest.approx((1 / (e4 + 2), 1 / (e4 + 2), e4 / (e4 + 2)))
    assert prediction.label == "training"
    assert prediction.confidence == pytest.approx(prediction.p_training)


def test_training_needs_the_threshold_else_the_likelier_other_class() -> None:
    strict = tiny_model(threshold=0.99)
    prediction = strict.predict({"busy_frac": 1.0})  # p_training ~0.965 < 0.99
    assert prediction.label in ("idle", "inference")
    assert prediction.p_training == pytest.approx(0.9647, abs=1e-3)


def test_a_window_without_any_model_feature_is_idle_with_no_confidence() -> None:
    assert tiny_model().classify({"power_mean_w": 300.0}) == ("idle", 0.0)


@given(st.dictionaries(st.sampled_from(load_packaged_model().feature_names), st.floats()))
def test_any_feature_values_give_a_distribution(features: dict[str, float]) -> None:
    prediction = load_packaged_model().predict(features)
    assert sum(prediction.probabilities) == pytest.approx(1.0)
    assert prediction.label in CLASSES
    assert 0.0 <= prediction.confidence <= 1.0


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    loaded = load_model(write_model(model, tmp_path / "m.json"))
    assert loaded.to_document() == model.to_document()


def _document() -> dict[str, Any]:
    return tiny_model().to_document()


def _without(key: str) -> dict[str, Any]:
    document = _document()
    del document[key]
    return document


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    document = copy.deepcopy(_document())
    target: Any = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    "document",
    [
        _with(("format",), "pickle"),
        _with(("classes",), ["training", "inference", "idle"]),
        _without("model_version"),
        _with(("model_version",), ""),
        _with(("training_threshold",), 0.0),
        _with(("training_threshold",), True),
        _with(("intercepts",), [0.0, 0.0]),
        _with(("intercepts",), [0.0, "x", 0.0]),
        _with(("features",), {}),
        _with(("features", 0, "thresholds"), [0.5, 0.5]),
        _with(("features", 0, "contributions"), [[0.0, 0.0, 0.0]]),
        _with(("features", 0, "missing"), [0.0]),
        _with(("features", 0, "name"), 7),
        _with(("features",), [_document()["features"][0]] * 2),
        _with(("provenance",), []),
    ],
    ids=[
        "wrong-format",
        "classes-reordered",
        "no-version",
        "empty-version",
        "zero-threshold",
        "bool-threshold",
        "short-intercepts",
        "text-intercept",
        "features-not-list",
        "thresholds-not-ascending",
        "too-few-rows",
        "short-missing",
        "nameless-feature",
        "duplicate-feature",
        "provenance-not-object",
    ],
)
def test_malformed_documents_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ModelFormatError):
        model_from_document(document)


@pytest.mark.parametrize(
    "text",
    ["", "[]", "not json", '{"format": "gpuattest-classifier/1"}'],
    ids=["empty", "list", "garbage", "incomplete"],
)
def test_unreadable_model_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_the_packaged_document_is_plain_json_data() -> None:
    from server.classifier.model import packaged_model_path

    path = packaged_model_path()
    assert path is not None
    document = json.loads(path.read_text())
    assert document["format"] == "gpuattest-classifier/1"
    assert {f["name"] for f in document["features"]} == set(load_packaged_model().feature_names)


# Model v2 (issue 3): the committed artifact the loader default should point at.
V2_FEATURES = {"util_busy_jitter_frac", "util_busy_mad_pct", "util_saturated_warm_frac"}


def test_the_committed_v2_model_reads_the_new_features_over_10_s_windows() -> None:
    from server.classifier.fit import MODEL_FEATURES

    path = Path(__file__).resolve().parents[3] / "server/classifier/models"
    model = load_model(path / "gpuattest-classifier-v2.json")
    assert model.model_version.startswith("gpuattest-classifier-v2+")
    assert model.window_s == 10.0
    assert model.feature_names == MODEL_FEATURES
    assert set(model.feature_names) >= V2_FEATURES
    assert 0.5 <= model.training_threshold <= 0.99
