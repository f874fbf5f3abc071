"""Judge the fitting procedure on recordings it never saw: leave one recording out.

For every recording: fit on all the *other* recordings (threshold included, from their own
inner folds), classify the held-out one, aggregate with hysteresis. A recording is never on
both sides (:func:`assert_disjoint` stops the run if it were). Training recordings are also
replayed subsampled to 250 ms through the same held-out model, to show that the sampling
interval is not what the model reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, median
from typing import Any

from proto.errors import GpuattestError
from server.classifier.aggregate import WindowVerdict, recording_verdict
from server.classifier.dataset import (
    MIXED,
    WINDOW_S,
    RecordingData,
    WindowRow,
    discover,
    load_recording_data,
)
from server.classifier.fit import DEFAULT_SETTINGS, FitSettings, fit_model
from server.classifier.model import CLASSES, StumpModel

SUBSAMPLE_INTERVAL_S = 0.25


class LeakageError(GpuattestError):
    """A recording was about to be used for fitting and for evaluation at once."""


def assert_disjoint(fitted: Iterable[str], evaluated: Iterable[str]) -> None:
    """Raise LeakageError when a recording (or a resampled copy of it) is on both sides."""
    base = {_base_name(name) for name in fitted}
    shared = sorted({_base_name(name) for name in evaluated} & base)
    if shared:
        raise LeakageError(f"recordings used for fitting and evaluation: {', '.join(shared)}")


def _base_name(name: str) -> str:
    """The recording a (possibly resampled, ``name@250ms``) copy comes from."""
    return name.split("@", 1)[0]


@dataclass(frozen=True)
class HeldOut:
    """One recording classified by a model that never saw it."""

    name: str
    label: str
    verdict: str
    confidence: float
    first_training_s: float | None
    first_busy_s: float | None
    rows: tuple[WindowRow, ...]
    labels: tuple[str, ...]  # predicted label per row
    p_training: tuple[float, ...]
    model_version: str
    threshold: float

    @property
    def time_to_detect_s(self) -> float | None:
        """Seconds from the first busy second to the training alarm (training recordings)."""
        if self.first_training_s is None or self.first_busy_s is None:
            return None
        return self.first_training_s - self.first_busy_s


@dataclass
class Evaluation:
    """All held-out results, native and subsampled."""

    native: list[HeldOut] = field(default_factory=list)
    subsampled: list[HeldOut] = field(default_factory=list)

    def summary(self, which: str = "native") -> dict[str, Any]:
        """Headline figures of ``native`` or ``subsampled`` results."""
        return summarise(self.native if which == "native" else self.subsampled)


def classify_held_out(data: RecordingData, model: StumpModel) -> HeldOut:
    """Classify a held-out recording's rows and aggregate them."""
    predictions = [model.predict(row.features) for row in data.rows]
    verdicts = [
        WindowVerdict(row.gpu, row.start_s, row.end_s, p.label, p.p_training, p.confidence)
        for row, p in zip(data.rows, predictions, strict=True)
    ]
    result = recording_verdict(verdicts)
    return HeldOut(
        name=data.name,
        label=data.label,
        verdict=result.verdict,
        confidence=result.confidence,
        first_training_s=result.first_training_s,
        first_busy_s=data.first_busy_s,
        rows=data.rows,
        labels=tuple(p.label for p in predictions),
        p_training=tuple(p.p_training for p in predictions),
        model_version=model.model_version,
        threshold=model.training_threshold,
    )


def leave_one_recording_out(
    data: Sequence[RecordingData],
    subsampled: Mapping[str, RecordingData] | None = None,
    settings: FitSettings = DEFAULT_SETTINGS,
    progress: Any = None,
) -> Evaluation:
    """Fit without each recording in turn and classify it (and its subsampled copy)."""
    evaluation = Evaluation()
    for held in data:
        fitting = [item for item in data if item.name != held.name]
        evaluated = [held.name]
        if subsampled and held.name in subsampled:
            evaluated.append(subsampled[held.name].name)
        rows = [row for item in fitting for row in item.rows]
        assert_disjoint({row.recording for row in rows}, evaluated)
        model = fit_model(rows, settings)
        evaluation.native.append(classify_held_out(held, model))
        if subsampled and held.name in subsampled:
            evaluation.subsampled.append(classify_held_out(subsampled[held.name], model))
        if progress is not None:
            progress(evaluation.native[-1])
    return evaluation


def load_data(
    data_dir: Path,
    subsample_interval_s: float | None = SUBSAMPLE_INTERVAL_S,
    window_s: float = WINDOW_S,
) -> tuple[list[RecordingData], dict[str, RecordingData]]:
    """Every labelled recording cut into ``window_s`` windows, plus subsampled training copies."""
    items = discover(data_dir)
    data = [load_recording_data(item, window_s=window_s) for item in items]
    copies: dict[str, RecordingData] = {}
    if subsample_interval_s is not None:
        for item in items:
            if item.label == "training":
                copies[item.name] = load_recording_data(item, subsample_interval_s, window_s)
    return data, copies


# --- figures of merit ---------------------------------------------------------------------------


def window_confusion(results: Sequence[HeldOut]) -> dict[str, dict[str, int]]:
    """Truth x predicted counts over windows with a clear truth."""
    counts: Counter[tuple[str, str]] = Counter()
    for held in results:
        for row, label in zip(held.rows, held.labels, strict=True):
            if row.truth != MIXED:
                counts[(row.truth, label)] += 1
    return {truth: {label: counts[(truth, label)] for label in CLASSES} for truth in CLASSES}


def recording_confusion(results: Sequence[HeldOut]) -> dict[str, dict[str, int]]:
    """Recording label x verdict counts."""
    counts = Counter((held.label, held.verdict) for held in results)
    labels = sorted({held.label for held in results})
    return {label: {verdict: counts[(label, verdict)] for verdict in CLASSES} for label in labels}


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summarise(results: Sequence[HeldOut]) -> dict[str, Any]:
    """Recording accuracy, window FPR on inference, window detection on training, TTD."""
    windows = window_confusion(results)
    inference_total = sum(windows["inference"].values())
    training_total = sum(windows["training"].values())
    detect = [h.time_to_detect_s for h in results if h.label == "training"]
    detected = [t for t in detect if t is not None]
    return {
        "recordings": len(results),
        "recording_accuracy": _rate(sum(h.verdict == h.label for h in results), len(results)),
        "window_fpr_inference": _rate(windows["inference"]["training"], inference_total),
        "window_detection_training": _rate(windows["training"]["training"], training_total),
        "windows_mixed_excluded": sum(row.truth == MIXED for held in results for row in held.rows),
        "time_to_detect_s": {h.name: h.time_to_detect_s for h in results if h.label == "training"},
        "time_to_detect_median_s": median(detected) if detected else None,
        "time_to_detect_max_s": max(detected) if detected else None,
        "training_thresholds_mean": fmean(h.threshold for h in results) if results else None,
        "window_confusion": windows,
        "recording_confusion": recording_confusion(results),
    }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f} %"


def _seconds(value: float | None) -> str:
    return "not detected" if value is None else f"{value:.1f} s"


def report_markdown(evaluation: Evaluation) -> str:
    """The evaluation as Markdown tables (what docs/classifier.md quotes)."""
    lines: list[str] = []
    for which, results in (("native", evaluation.native), ("subsampled", evaluation.subsampled)):
        if not results:
            continue
        s = summarise(results)
        title = "as recorded" if which == "native" else "training logs subsampled to 250 ms"
        lines += [
            f"### Held-out results, {title}",
            "",
            "| figure | value |",
            "|---|---|",
            f"| recordings | {s['recordings']} |",
            f"| recording accuracy | {_percent(s['recording_accuracy'])} |",
            f"| inference windows called training | {_percent(s['window_fpr_inference'])} |",
            f"| training windows called training | {_percent(s['window_detection_training'])} |",
            f"| time to detect, median / worst | {_seconds(s['time_to_detect_median_s'])} / "
            f"{_seconds(s['time_to_detect_max_s'])} |",
            f"| mixed windows (not scored) | {s['windows_mixed_excluded']} |",
            "",
            "| truth \\ called | " + " | ".join(CLASSES) + " |",
            "|---|" + "---|" * len(CLASSES),
        ]
        for truth, row in s["window_confusion"].items():
            lines.append(f"| {truth} windows | " + " | ".join(str(row[c]) for c in CLASSES) + " |")
        for label, row in s["recording_confusion"].items():
            lines.append(
                f"| {label} recordings | " + " | ".join(str(row[c]) for c in CLASSES) + " |"
            )
        lines += [
            "",
            "| recording | label | verdict | confidence | time to detect |",
            "|---|---|---|---|---|",
        ]
        for held in results:
            ttd = _seconds(held.time_to_detect_s) if held.label == "training" else ""
            lines.append(
                f"| {held.name} | {held.label} | {held.verdict} | {held.confidence:.2f} | {ttd} |"
            )
        lines.append("")
    return "\n".join(lines)
