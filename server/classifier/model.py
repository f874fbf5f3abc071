"""The fitted classifier as a plain JSON document, evaluated with numpy and the standard library.

The verifier is a security boundary: it never unpickles anything, so the model travels as
data. The model is additive (gradient-boosted decision stumps, see ``docs/classifier.md``): for
every class and every feature a step function of that feature's value, summed into a logit
per class and turned into probabilities with a softmax. Each feature's step function is
stored as ascending thresholds and one contribution per interval, so one window costs a few
binary searches, and each feature's part in a verdict can be read off directly.

Document shape (``format`` = ``gpuattest-classifier/1``)::

    {"format": ..., "model_version": str, "classes": ["idle", "inference", "training"],
     "training_threshold": float,   # call "training" only at p_training >= this
     "window_s": float,             # window length the features were computed over
     "intercepts": [float per class],
     "features": [{"name": str, "thresholds": [float, ...],        # ascending
                   "contributions": [[float per class] per interval],  # len(thresholds) + 1
                   "missing": [float per class]}, ...],
     "provenance": {...}}           # how it was fitted; not used for prediction

A value ``x`` falls in interval ``i`` = the number of thresholds strictly below ``x``
(``bisect_left``), the convention of the fitted trees (left branch when ``x <= threshold``).
Values are rounded to float32 first, as the fitting library compares them.

Features such as ``busy_frac`` or ``power_rel_spread_frac`` mean different things over 5 s and
over 10 s, so a model is only valid for windows of the length it was fitted on: ``window_s``
says which, and :meth:`StumpModel.check_window_s` refuses any other. Documents written before
the field existed were fitted on the agent's default 10 s windows and load as such.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proto.errors import GpuattestError

FORMAT = "gpuattest-classifier/1"
CLASSES = ("idle", "inference", "training")
TRAINING = CLASSES.index("training")
DEFAULT_MODEL_RESOURCE = "gpuattest-classifier-v2.json"
# What every model was fitted on before documents recorded it: the agent's default window.
DEFAULT_WINDOW_S = 10.0
# Window edges are multiples of the length on the agent's clock and travel as integer
# nanoseconds, so a real mismatch is whole seconds while rounding stays far below this.
_WINDOW_TOLERANCE_S = 1e-3
# A window offering none of the model's features is judged by nothing: say so.
_NO_EVIDENCE = ("idle", 0.0)


FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


class ModelFormatError(GpuattestError, ValueError):
    """A model document that is not a well-formed gpuattest classifier."""


class WindowLengthError(GpuattestError, ValueError):
    """Windows of a length the model was not fitted for: its verdicts would mean nothing."""


@dataclass(frozen=True)
class StepFunction:
    """One feature's contribution to every class's logit, as a step function of its value."""

    name: str
    thresholds: tuple[float, ...]
    contributions: tuple[tuple[float, ...], ...]  # per interval, per class
    missing: tuple[float, ...]  # per class, when the window lacks the feature

    def contribution(self, value: float | None) -> tuple[float, ...]:
        """Per-class logit contribution of ``value`` (None or non-finite: missing)."""
        if value is None or not math.isfinite(value):
            return self.missing
        return self.contributions[bisect.bisect_left(self.thresholds, _as_float32(value))]


@dataclass(frozen=True)
class Prediction:
    """One window's verdict: the label, its probability, and every class's probability."""

    label: str
    confidence: float
    probabilities: tuple[float, ...]  # in CLASSES order

    @property
    def p_training(self) -> float:
        """Probability of the training class."""
        return self.probabilities[TRAINING]


@dataclass(frozen=True)
class _StepTables:
    """Every step function of a model padded into arrays, to score many windows at once.

    ``thresholds[j]`` holds feature j's thresholds, padded with +inf (never below any
    value, so padding never moves a value to a later interval); ``contributions[j, i]`` is
    the row of interval ``i`` and ``contributions[j, missing]`` the row for a missing or
    non-finite value.
    """

    intercepts: FloatArray  # (classes,)
    thresholds: FloatArray  # (features, width)
    contributions: FloatArray  # (features, width + 2, classes)
    missing: int  # index of the "missing" row in every feature's contributions
    features: IntArray  # 0 .. features - 1

    @classmethod
    def build(cls, intercepts: Sequence[float], steps: Sequence[StepFunction]) -> _StepTables:
        """Pad the step functions of ``steps`` into one table each."""
        width = max((len(step.thresholds) for step in steps), default=0)
        thresholds = np.full((len(steps), width), np.inf)
        contributions = np.zeros((len(steps), width + 2, len(CLASSES)))
        for j, step in enumerate(steps):
            thresholds[j, : len(step.thresholds)] = step.thresholds
            contributions[j, : len(step.contributions)] = step.contributions
            contributions[j, width + 1] = step.missing
        return cls(
            np.array(intercepts), thresholds, contributions, width + 1, np.arange(len(steps))
        )

    def parts(self, values: FloatArray) -> FloatArray:
        """Contributions per window, feature and class, of ``values`` (windows x features).

        A new array: the caller may change it.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            # Rounded to float32 first, as StepFunction.contribution does.
            rounded = values.astype(np.float32).astype(np.float64)
        # bisect_left: the number of thresholds strictly below the value.
        below: IntArray = (self.thresholds[np.newaxis] < rounded[:, :, np.newaxis]).sum(axis=2)
        interval = np.where(np.isfinite(values), below, self.missing)
        parts: FloatArray = self.contributions[self.features[np.newaxis, :], interval]
        return parts


def _as_float32(value: float) -> float:
    # Beyond float32's range the value becomes +-inf, which still sorts correctly.
    with np.errstate(over="ignore"):
        return float(np.float32(value))


class StumpModel:
    """The additive classifier; implements the verifier's ``Classifier`` protocol."""

    def __init__(
        self,
        model_version: str,
        intercepts: Sequence[float],
        steps: Sequence[StepFunction],
        training_threshold: float,
        provenance: Mapping[str, Any] | None = None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        self._model_version = model_version
        self.intercepts = tuple(float(v) for v in intercepts)
        self.steps = tuple(steps)
        self.training_threshold = float(training_threshold)
        self.provenance: Mapping[str, Any] = dict(provenance or {})
        self.window_s = float(window_s)

    @property
    def model_version(self) -> str:
        """Stored with every verdict so results stay attributable to this model."""
        return self._model_version

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The features the model reads, in document order."""
        return tuple(step.name for step in self.steps)

    def check_window_s(self, window_s: float) -> None:
        """Raise WindowLengthError unless ``window_s`` is the length the model was fitted on."""
        if not (math.isfinite(window_s) and abs(window_s - self.window_s) <= _WINDOW_TOLERANCE_S):
            raise WindowLengthError(
                f"model {self.model_version} was fitted on {self.window_s:g} s windows, "
                f"not {window_s:g} s: refit it or set the agent's window_s to {self.window_s:g}"
            )

    def logits(self, features: Mapping[str, float]) -> list[float]:
        """Per-class logits: intercepts plus every feature's contribution."""
        total = list(self.intercepts)
        for step in self.steps:
            for k, part in enumerate(step.contribution(features.get(step.name))):
                total[k] += part
        return total

    def predict(self, features: Mapping[str, float]) -> Prediction:
        """Probabilities and label for one window's features."""
        if not any(name in features for name in self.feature_names):
            return _no_evidence()
        probabilities = _softmax(self.logits(features))
        return Prediction(*self._decide(probabilities), probabilities)

    def predict_many(self, rows: Sequence[Mapping[str, float]]) -> list[Prediction]:
        """``predict`` for each row, the step functions evaluated for all rows at once.

        Gives exactly what :meth:`predict` gives (the same float32 rounding, intervals,
        summation order, softmax and decision), at a fraction of the cost for the 8 GPU
        windows of a host: the verifier scores every envelope's windows this way.
        """
        return [
            Prediction(label, confidence, tuple(probabilities))
            for label, confidence, probabilities in zip(*self._score(rows), strict=True)
        ]

    def classify(self, features: Mapping[str, float]) -> tuple[str, float]:
        """The verifier's hook: (verdict, confidence) for one GPU window."""
        prediction = self.predict(features)
        return prediction.label, round(prediction.confidence, 6)

    def classify_many(self, rows: Sequence[Mapping[str, float]]) -> list[tuple[str, float]]:
        """``classify`` for each row (all GPU windows of an envelope), as one batch."""
        labels, confidences, _ = self._score(rows)
        return [(label, round(c, 6)) for label, c in zip(labels, confidences, strict=True)]

    def _score(
        self, rows: Sequence[Mapping[str, float]]
    ) -> tuple[list[str], list[float], list[list[float]]]:
        """Labels, confidences and probabilities of ``rows``, computed as predict() does."""
        if not rows:
            return [], [], []
        names = self.feature_names
        values = np.array([[row.get(name, math.nan) for name in names] for row in rows])
        parts = self._tables.parts(values.reshape(len(rows), len(names)))
        # Summed in the order logits() sums (intercepts, then features in document order):
        # cumsum adds sequentially, where sum() would add pairwise and round differently.
        if names:
            parts[:, 0, :] += self._tables.intercepts  # intercept + first feature's part
            logits = np.cumsum(parts, axis=1)[:, -1, :]
        else:
            logits = np.tile(self._tables.intercepts, (len(rows), 1))
        probabilities = _softmax_rows(logits)
        labels, confidences = self._decide_rows(probabilities)
        wanted = frozenset(names)
        for i, row in enumerate(rows):
            if row.keys().isdisjoint(wanted):
                labels[i], confidences[i] = _NO_EVIDENCE
                probabilities[i] = list(_no_evidence().probabilities)
        return labels, confidences, probabilities

    def _decide_rows(self, probabilities: list[list[float]]) -> tuple[list[str], list[float]]:
        """``_decide`` for each row of probabilities."""
        decided = [self._decide(tuple(row)) for row in probabilities]
        return [label for label, _ in decided], [confidence for _, confidence in decided]

    @functools.cached_property
    def _tables(self) -> _StepTables:
        return _StepTables.build(self.intercepts, self.steps)

    def _decide(self, probabilities: tuple[float, ...]) -> tuple[str, float]:
        # Calling training is the costly mistake for a compliance team, so it needs
        # p_training above a threshold fitted to keep false positives rare; otherwise the
        # likelier of idle and inference.
        if probabilities[TRAINING] >= self.training_threshold:
            return "training", probabilities[TRAINING]
        best = max(
            (k for k in range(len(CLASSES)) if k != TRAINING), key=lambda k: probabilities[k]
        )
        return CLASSES[best], probabilities[best]

    def to_document(self) -> dict[str, Any]:
        """The JSON-ready document (see the module docstring)."""
        return {
            "format": FORMAT,
            "model_version": self.model_version,
            "classes": list(CLASSES),
            "training_threshold": self.training_threshold,
            "window_s": self.window_s,
            "intercepts": list(self.intercepts),
            "features": [
                {
                    "name": step.name,
                    "thresholds": list(step.thresholds),
                    "contributions": [list(row) for row in step.contributions],
                    "missing": list(step.missing),
                }
                for step in self.steps
            ],
            "provenance": dict(self.provenance),
        }


def _no_evidence() -> Prediction:
    label, confidence = _NO_EVIDENCE
    return Prediction(label, confidence, (1.0, 0.0, 0.0))


def _softmax(logits: Sequence[float]) -> tuple[float, ...]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return tuple(v / total for v in exps)


def _softmax_rows(logits: FloatArray) -> list[list[float]]:
    """``_softmax`` of each row (math.exp, not numpy's: bit for bit what predict() gives)."""
    return [list(_softmax(row)) for row in logits.tolist()]


# --- loading --------------------------------------------------------------------------------


def model_from_document(document: Mapping[str, Any]) -> StumpModel:
    """Validate a parsed document and build the model; ModelFormatError when malformed."""
    if document.get("format") != FORMAT:
        raise ModelFormatError(f"not a {FORMAT} document (format={document.get('format')!r})")
    if list(document.get("classes", ())) != list(CLASSES):
        raise ModelFormatError(f"classes must be {list(CLASSES)}")
    version = document.get("model_version")
    if not isinstance(version, str) or not version:
        raise ModelFormatError("model_version must be a non-empty string")
    threshold = _number(document.get("training_threshold"), "training_threshold")
    if not 0.0 < threshold <= 1.0:
        raise ModelFormatError(f"training_threshold must be in (0, 1], got {threshold}")
    window_s = _number(document.get("window_s", DEFAULT_WINDOW_S), "window_s")
    if window_s <= 0.0:
        raise ModelFormatError(f"window_s must be positive, got {window_s}")
    intercepts = _vector(document.get("intercepts"), "intercepts")
    raw_features = document.get("features")
    if not isinstance(raw_features, list):
        raise ModelFormatError("features must be a list")
    steps = [_step_function(item) for item in raw_features]
    if len({step.name for step in steps}) != len(steps):
        raise ModelFormatError("a feature appears twice")
    provenance = document.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ModelFormatError("provenance must be an object")
    return StumpModel(version, intercepts, steps, threshold, provenance, window_s=window_s)


def _step_function(item: Any) -> StepFunction:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ModelFormatError("each feature needs a name")
    name = item["name"]
    raw_thresholds = item.get("thresholds")
    if not isinstance(raw_thresholds, list):
        raise ModelFormatError(f"{name}: thresholds must be a list")
    thresholds = tuple(_number(v, f"{name} threshold") for v in raw_thresholds)
    if any(b <= a for a, b in itertools.pairwise(thresholds)):
        raise ModelFormatError(f"{name}: thresholds must be strictly ascending")
    raw_rows = item.get("contributions")
    if not isinstance(raw_rows, list) or len(raw_rows) != len(thresholds) + 1:
        raise ModelFormatError(f"{name}: need one contribution row per interval")
    rows = tuple(_vector(row, f"{name} contributions") for row in raw_rows)
    return StepFunction(name, thresholds, rows, _vector(item.get("missing"), f"{name} missing"))


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ModelFormatError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _vector(value: Any, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != len(CLASSES):
        raise ModelFormatError(f"{what} must list one number per class")
    return tuple(_number(v, what) for v in value)


def load_model(path: Path) -> StumpModel:
    """Read a model document from ``path`` (JSON only; nothing is executed or unpickled)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"cannot read model {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise ModelFormatError(f"{path}: a model document is a JSON object")
    return model_from_document(document)


def packaged_model_path() -> Path | None:
    """The model shipped with the package, or None when it is not installed."""
    resource = resources.files("server.classifier").joinpath("models", DEFAULT_MODEL_RESOURCE)
    path = Path(str(resource))
    return path if path.is_file() else None


def load_packaged_model() -> StumpModel:
    """The model shipped with the package; ModelFormatError when it is absent."""
    path = packaged_model_path()
    if path is None:
        raise ModelFormatError(f"the packaged model {DEFAULT_MODEL_RESOURCE} is not installed")
    return load_model(path)


def write_model(model: StumpModel, path: Path) -> Path:
    """Write the model document as stable, diff-friendly JSON; returns ``path``."""
    text = json.dumps(model.to_document(), indent=1, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path
