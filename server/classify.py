"""The classification hook the verifier calls for every appraised GPU window.

The verifier uses the fitted model shipped with the package (:mod:`server.classifier`, a
JSON document read without pickle) when it is installed; otherwise :class:`ProvisionalRule`,
a hand-written threshold rule whose model version says so, and whose confidence is capped
so nobody mistakes its verdicts for the real model's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

VERDICTS = ("training", "inference", "idle")

log = logging.getLogger(__name__)


class Classifier(Protocol):
    """Maps one GPU window's features to a verdict and a confidence in [0, 1]."""

    @property
    def model_version(self) -> str:
        """Stored with every verdict so results stay attributable to a model."""
        ...

    def classify(self, features: Mapping[str, float]) -> tuple[str, float]:
        """Return (verdict, confidence); verdict is one of VERDICTS."""
        ...

    def classify_many(self, rows: Sequence[Mapping[str, float]]) -> list[tuple[str, float]]:
        """``classify`` for each row: the GPU windows of one envelope, scored together."""
        ...


class ProvisionalRule:
    """Threshold rule on duty cycle, standing in until a fitted model exists.

    Training keeps a GPU busy nearly all the time with little variation; serving is
    request-driven, so its utilization comes in bursts with idle gaps; idle does nothing.
    """

    model_version = "provisional-rule-v0"
    # A threshold rule is not evidence of much; never claim more than this.
    max_confidence = 0.75

    def classify(self, features: Mapping[str, float]) -> tuple[str, float]:
        """Classify from busy/idle fractions and utilization spread."""
        busy = features.get("busy_frac")
        idle = features.get("idle_frac")
        spread = features.get("util_gpu_std_pct")
        if busy is None or idle is None:
            return "idle", 0.0  # nothing to judge by: say so with zero confidence
        if idle >= 0.95:
            return "idle", self._confidence(idle, 0.95)
        if busy >= 0.9 and (spread is None or spread <= 20.0):
            return "training", self._confidence(busy, 0.9)
        return "inference", self._confidence(1.0 - busy, 0.1)

    def classify_many(self, rows: Sequence[Mapping[str, float]]) -> list[tuple[str, float]]:
        """``classify`` for each row."""
        return [self.classify(row) for row in rows]

    def _confidence(self, value: float, threshold: float) -> float:
        # Further past the threshold means more confident, up to the cap.
        margin = (value - threshold) / max(1.0 - threshold, 1e-9)
        return round(min(self.max_confidence, 0.5 + 0.25 * max(0.0, min(1.0, margin))), 4)


def default_classifier() -> Classifier:
    """The packaged fitted model, or the provisional rule when the model is not installed."""
    from server.classifier.model import ModelFormatError, load_packaged_model

    try:
        return load_packaged_model()
    except ModelFormatError as exc:
        log.warning(
            "fitted classifier unavailable (%s); using %s", exc, ProvisionalRule.model_version
        )
        return ProvisionalRule()
