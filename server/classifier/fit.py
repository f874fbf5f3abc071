"""Fit the additive stump classifier from labelled window rows, reproducibly, and export it.

scikit-learn (a development dependency only) fits gradient-boosted decision stumps; the fitted
stumps are folded into one step function per feature (see :mod:`server.classifier.model`),
checked to predict exactly what scikit-learn predicts, and written as JSON.

Choices that keep the model honest (the reasons are in ``docs/classifier.md``):

* only :data:`MODEL_FEATURES`, which describe the *shape* of utilization and power; never
  sampling interval, GPU count, memory level, absolute watts or fields one class's logs lack;
* every recording weighs the same within its class, and the classes weigh the same, so eight
  GPUs times 70 windows of one training run do not drown a one-GPU serving log;
* features the host may not expose (:data:`OPTIONAL_FEATURES`) are also shown to the fit as
  missing, so the model learns to judge without them;
* the training threshold comes from recordings held out *inside* the fitting data (grouped
  folds), chosen so that few of their inference windows would be called training.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from proto.errors import GpuattestError
from server.classifier.dataset import MIXED, WindowRow
from server.classifier.model import CLASSES, TRAINING, StepFunction, StumpModel

if TYPE_CHECKING:
    from sklearn.ensemble import GradientBoostingClassifier  # type: ignore[import-untyped]

FloatArray = npt.NDArray[np.float64]

MODEL_NAME = "gpuattest-classifier-v2"
MODEL_FEATURES: tuple[str, ...] = (
    "busy_frac",
    "idle_frac",
    "util_gpu_mean_pct",
    "util_gpu_std_pct",
    "util_saturated_frac",
    "util_active_mean_pct",
    "power_rel_spread_frac",
    "power_rel_rough_frac",
    "power_rel_peak_frac",
    "power_tdp_frac",
    "util_busy_cold_frac",
    # v2: how utilization moves while busy (the iteration rhythm aliased into the counter) and
    # pinned-but-warm utilization; they catch the compute phase of training within one window.
    "util_busy_jitter_frac",
    "util_busy_mad_pct",
    "util_saturated_warm_frac",
)
# Need the GPU model (SKU); an nvidia-smi log replayed offline may not say which it is.
OPTIONAL_FEATURES: tuple[str, ...] = (
    "power_tdp_frac",
    "util_busy_cold_frac",
    "util_saturated_warm_frac",
)
# Every model feature is >= 0, so this value can only mean "the window lacks the feature".
MISSING_SENTINEL = -1.0


class FitError(GpuattestError):
    """The rows cannot support a fit (a class is missing, nothing left after filtering)."""


@dataclass(frozen=True)
class FitSettings:
    """Hyper-parameters of a fit; the defaults build the committed artifact."""

    n_estimators: int = 100
    learning_rate: float = 0.15
    seed: int = 0
    inner_folds: int = 3
    # Share of held-out inference windows the threshold may call training.
    target_fpr: float = 0.005
    min_threshold: float = 0.5
    max_threshold: float = 0.99


DEFAULT_SETTINGS = FitSettings()

# --- design matrix ----------------------------------------------------------------------------


def fit_rows(rows: Sequence[WindowRow]) -> list[WindowRow]:
    """The rows a fit may learn from: those with a clear ground truth."""
    return [row for row in rows if row.truth != MIXED]


def design_matrix(
    rows: Sequence[WindowRow],
    features: Sequence[str] = MODEL_FEATURES,
    drop: Sequence[str] = (),
) -> FloatArray:
    """(rows, features) matrix, missing and dropped features as :data:`MISSING_SENTINEL`."""
    matrix = np.full((len(rows), len(features)), MISSING_SENTINEL)
    for i, row in enumerate(rows):
        for j, name in enumerate(features):
            value = row.features.get(name)
            if name not in drop and value is not None and math.isfinite(value):
                matrix[i, j] = value
    return matrix


def window_length_s(rows: Sequence[WindowRow]) -> float:
    """The one window length the rows were cut to (what the model will be valid for).

    Raises FitError when the rows mix lengths: features over 5 s and over 10 s windows are
    different quantities and must not be fitted as one.
    """
    # Rows carry nominal window edges (k * window_s), so every row of a cut has one length.
    lengths = sorted({round(row.end_s - row.start_s, 6) for row in rows})
    if len(lengths) != 1:
        found = ", ".join(f"{length:g}" for length in lengths) or "none"
        raise FitError(f"rows must share one window length, found: {found}")
    return lengths[0]


def sample_weights(rows: Sequence[WindowRow]) -> FloatArray:
    """Weights giving each recording the same say within its class and each class the same."""
    per_recording = Counter((row.recording, row.truth) for row in rows)
    recordings_per_class = Counter(truth for _, truth in per_recording)
    weights: FloatArray = np.array(
        [
            1.0 / (per_recording[(row.recording, row.truth)] * recordings_per_class[row.truth])
            for row in rows
        ],
        dtype=np.float64,
    )
    scaled: FloatArray = weights * (len(rows) / weights.sum())
    return scaled


def _augmented(rows: Sequence[WindowRow]) -> tuple[FloatArray, npt.NDArray[np.int64], FloatArray]:
    """Design matrix with a second copy of every row lacking the optional features."""
    labels = np.array([CLASSES.index(row.truth) for row in rows], dtype=np.int64)
    weights = sample_weights(rows)
    full = design_matrix(rows)
    reduced = design_matrix(rows, drop=OPTIONAL_FEATURES)
    return (
        np.vstack([full, reduced]),
        np.concatenate([labels, labels]),
        np.concatenate([weights, weights]) / 2.0,
    )


# --- fitting -----------------------------------------------------------------------------------


def _require_all_classes(rows: Sequence[WindowRow]) -> None:
    present = {row.truth for row in rows}
    missing = [name for name in CLASSES if name not in present]
    if missing:
        raise FitError(f"no windows of class {', '.join(missing)} to fit on")


def fit_booster(rows: Sequence[WindowRow], settings: FitSettings) -> GradientBoostingClassifier:
    """Gradient-boosted stumps on the rows (scikit-learn, seeded, deterministic)."""
    from sklearn.ensemble import GradientBoostingClassifier

    _require_all_classes(rows)
    x, y, w = _augmented(rows)
    booster = GradientBoostingClassifier(
        loss="log_loss",
        max_depth=1,
        n_estimators=settings.n_estimators,
        learning_rate=settings.learning_rate,
        init="zero",
        random_state=settings.seed,
    )
    booster.fit(x, y, sample_weight=w)
    return booster


def step_functions(
    booster: GradientBoostingClassifier, x: FloatArray, weights: FloatArray
) -> tuple[list[float], list[StepFunction]]:
    """Fold the booster's stumps into intercepts and one step function per model feature."""
    rate = float(booster.learning_rate)
    intercepts = [0.0] * len(CLASSES)
    splits: dict[int, list[tuple[float, int, float, float]]] = {}
    for stage in booster.estimators_:
        for k, regressor in enumerate(stage):
            tree = regressor.tree_
            if tree.children_left[0] == -1:  # a stump that found no split: a constant
                intercepts[k] += rate * float(tree.value[0, 0, 0])
                continue
            left, right = int(tree.children_left[0]), int(tree.children_right[0])
            splits.setdefault(int(tree.feature[0]), []).append(
                (
                    float(tree.threshold[0]),
                    k,
                    rate * float(tree.value[left, 0, 0]),
                    rate * float(tree.value[right, 0, 0]),
                )
            )
    steps = [
        _step_function(name, splits.get(j, []), x[:, j], weights)
        for j, name in enumerate(MODEL_FEATURES)
    ]
    return intercepts, steps


def _step_function(
    name: str,
    splits: Sequence[tuple[float, int, float, float]],
    column: FloatArray,
    weights: FloatArray,
) -> StepFunction:
    thresholds = sorted({threshold for threshold, _, _, _ in splits})
    rows = []
    for interval in range(len(thresholds) + 1):
        # Inside interval i every value is <= thresholds[i] (and above the one before), so a
        # stump sends it left exactly when its own threshold is at or above thresholds[i].
        upper = thresholds[interval] if interval < len(thresholds) else math.inf
        row = [0.0] * len(CLASSES)
        for threshold, k, left, right in splits:
            row[k] += left if upper <= threshold else right
        rows.append(tuple(row))
    provisional = StepFunction(name, tuple(thresholds), tuple(rows), (0.0,) * len(CLASSES))
    return StepFunction(
        name,
        provisional.thresholds,
        provisional.contributions,
        _missing(provisional, column, weights),
    )


def _missing(step: StepFunction, column: FloatArray, weights: FloatArray) -> tuple[float, ...]:
    """What a window lacking the feature contributes.

    If the fit saw the feature missing (the sentinel), what it learned for that case;
    otherwise the weighted mean contribution over the fitting windows, i.e. "no evidence
    either way" relative to what the model is used to.
    """
    if np.any(column == MISSING_SENTINEL):
        return step.contribution(MISSING_SENTINEL)
    parts = np.array([step.contribution(float(value)) for value in column])
    mean = (parts * weights[:, None]).sum(axis=0) / weights.sum()
    return tuple(float(v) for v in mean)


def fit_model(
    rows: Sequence[WindowRow],
    settings: FitSettings = DEFAULT_SETTINGS,
    *,
    name: str = MODEL_NAME,
) -> StumpModel:
    """Fit on the rows' recordings and return the exported, verified model.

    The training threshold is chosen from grouped inner folds (whole recordings held out);
    the model itself is then fitted on all rows.
    """
    usable = fit_rows(rows)
    window_s = window_length_s(usable)
    booster = fit_booster(usable, settings)
    x, _, w = _augmented(usable)
    intercepts, steps = step_functions(booster, x, w)
    threshold, inner = training_threshold(usable, settings)
    provenance = {
        "recordings": sorted({row.recording for row in usable}),
        "windows": len(usable),
        "window_classes": dict(sorted(Counter(row.truth for row in usable).items())),
        "settings": asdict(settings),
        "threshold_from_inner_folds": inner,
        "fitted_with": _library_versions(),
    }
    model = StumpModel(name, intercepts, steps, threshold, provenance, window_s=window_s)
    _check_export(model, booster, x)
    digest = hashlib.sha256(json.dumps(model.to_document(), sort_keys=True).encode()).hexdigest()
    return StumpModel(
        f"{name}+{digest[:10]}", intercepts, steps, threshold, provenance, window_s=window_s
    )


def _library_versions() -> dict[str, str]:
    import sklearn  # type: ignore[import-untyped]

    return {"scikit-learn": sklearn.__version__, "numpy": np.__version__}


def _check_export(model: StumpModel, booster: GradientBoostingClassifier, x: FloatArray) -> None:
    """The JSON model must predict what scikit-learn predicts, to rounding."""
    expected = booster.predict_proba(x)
    for row, wanted in zip(x, expected, strict=True):
        features = {
            name: float(value)
            for name, value in zip(MODEL_FEATURES, row, strict=True)
            if value != MISSING_SENTINEL
        }
        got = model.predict(features).probabilities if features else None
        if got is not None and max(abs(a - b) for a, b in zip(got, wanted, strict=True)) > 1e-6:
            raise FitError(f"exported model disagrees with the fitted one: {got} vs {wanted}")


# --- the training threshold ------------------------------------------------------------------


def inner_folds(rows: Sequence[WindowRow], folds: int, seed: int) -> list[set[str]]:
    """Recordings split into ``folds`` groups, each class spread over the groups (seeded)."""
    rng = np.random.default_rng(seed)
    label_of = {row.recording: row.label for row in rows}
    groups: list[set[str]] = [set() for _ in range(folds)]
    for label in sorted(set(label_of.values())):
        names = sorted(name for name, value in label_of.items() if value == label)
        for position, index in enumerate(rng.permutation(len(names))):
            groups[position % folds].add(names[int(index)])
    return [group for group in groups if group]


def training_threshold(
    rows: Sequence[WindowRow], settings: FitSettings
) -> tuple[float, dict[str, Any]]:
    """Smallest threshold that calls at most target_fpr of inner held-out inference windows.

    Returns the threshold and a summary of how it was found (for the provenance).
    """
    held_out_p: list[float] = []
    used_folds = 0
    for group in inner_folds(rows, settings.inner_folds, settings.seed):
        fit_part = [row for row in rows if row.recording not in group]
        held = [row for row in rows if row.recording in group and row.truth == "inference"]
        if not held or {row.truth for row in fit_part} != set(CLASSES):
            continue
        booster = fit_booster(fit_part, settings)
        held_out_p.extend(booster.predict_proba(design_matrix(held))[:, TRAINING].tolist())
        used_folds += 1
    threshold = _threshold_for(held_out_p, settings)
    return threshold, {"folds": used_folds, "inference_windows": len(held_out_p)}


def _threshold_for(p_training: Sequence[float], settings: FitSettings) -> float:
    if not p_training:
        return settings.min_threshold
    ordered = sorted(p_training, reverse=True)
    allowed = math.floor(settings.target_fpr * len(ordered))
    # Just above the highest p_training that would push the count past the allowance.
    if allowed >= len(ordered):
        return settings.min_threshold
    threshold = float(np.nextafter(ordered[allowed], 2.0))
    return min(settings.max_threshold, max(settings.min_threshold, threshold))


def thresholds_summary(model: StumpModel) -> Mapping[str, int]:
    """Number of steps per feature (how much of the model each feature carries)."""
    return {step.name: len(step.thresholds) for step in model.steps}
