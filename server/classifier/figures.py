"""Figures for docs/classifier.md (matplotlib, a development dependency only).

* ``classifier-features.png``: how each model feature is distributed over windows of each class
  (ground truth), all recordings;
* ``classifier-heldout.png``: p_training over time for recordings classified by models that
  never saw them (leave-one-recording-out), with each model's training threshold;
* ``classifier-steps.png``: what the given model makes of each feature (training logit minus
  inference logit, as a function of the feature's value).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from server.classifier.dataset import MIXED, RecordingData
from server.classifier.evaluate import Evaluation, HeldOut
from server.classifier.fit import MODEL_FEATURES
from server.classifier.model import CLASSES, TRAINING, StumpModel

_COLOURS = {"idle": "tab:gray", "inference": "tab:blue", "training": "tab:red"}
_HELD_OUT_PANELS = 8


def write_figures(
    evaluation: Evaluation,
    data: Sequence[RecordingData],
    out_dir: Path,
    model: StumpModel | None = None,
) -> list[Path]:
    """Write the figures into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _features_figure(data, out_dir / "classifier-features.png"),
        _held_out_figure(evaluation.native, out_dir / "classifier-heldout.png"),
    ]
    if model is not None:
        paths.append(_steps_figure(model, out_dir / "classifier-steps.png"))
    return paths


def _features_figure(data: Sequence[RecordingData], path: Path) -> Path:
    import matplotlib.pyplot as plt

    columns = 4
    rows = -(-len(MODEL_FEATURES) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.6 * rows))
    by_class: dict[str, list[dict[str, float]]] = defaultdict(list)
    for item in data:
        for row in item.rows:
            if row.truth != MIXED:
                by_class[row.truth].append(row.features)
    for axis, name in zip(axes.flat, MODEL_FEATURES, strict=False):
        for label in CLASSES:
            values = [f[name] for f in by_class[label] if name in f]
            if values:
                axis.hist(
                    values, bins=30, density=True, histtype="step", color=_COLOURS[label],
                    label=f"{label} ({len(values)})",
                )  # fmt: skip
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.set_yticks([])
    for axis in list(axes.flat)[len(MODEL_FEATURES) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("Model features per window, by ground truth (density; all recordings)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _mean_p_by_window(held: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    sums: dict[float, list[float]] = defaultdict(list)
    for row, p in zip(held.rows, held.p_training, strict=True):
        sums[row.start_s].append(p)
    starts = np.array(sorted(sums))
    return starts, np.array([max(sums[s]) for s in starts])


def _held_out_figure(results: Sequence[HeldOut], path: Path) -> Path:
    import matplotlib.pyplot as plt

    training = [h for h in results if h.label == "training"]
    inference = sorted((h for h in results if h.label == "inference"), key=lambda h: -len(h.rows))
    chosen = (training + inference)[:_HELD_OUT_PANELS]
    figure, axes = plt.subplots(len(chosen), 1, figsize=(10, 1.5 * len(chosen)), sharey=True)
    for axis, held in zip(np.atleast_1d(axes), chosen, strict=True):
        starts, p = _mean_p_by_window(held)
        axis.step(starts, p, where="post", color=_COLOURS[held.label], lw=1)
        axis.axhline(held.threshold, color="black", lw=0.6, ls="--")
        if held.first_training_s is not None:
            axis.axvline(held.first_training_s, color="tab:red", lw=0.8, ls=":")
        name = held.name.split("/")[-2] if held.name.endswith("power.csv") else held.name
        axis.set_title(f"{name} - {held.label}, called {held.verdict}", fontsize=8, loc="left")
        axis.set_ylim(-0.05, 1.05)
        axis.tick_params(labelsize=7)
    np.atleast_1d(axes)[-1].set_xlabel("seconds since the first sample")
    figure.suptitle(
        "Held-out p_training (highest GPU per window); dashed: threshold, dotted: alarm",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _natural_range(name: str, thresholds: Sequence[float]) -> tuple[float, float]:
    """The x range worth plotting: the unit's range, else around the thresholds."""
    if name.endswith("_frac"):
        return 0.0, 1.0
    if name.endswith("_pct"):
        return 0.0, 100.0
    edges = [t for t in thresholds if t >= 0]
    low, high = (min(edges), max(edges)) if edges else (0.0, 1.0)
    span = max(high - low, 1e-6)
    return low - 0.1 * span, high + 0.1 * span


def _steps_figure(model: StumpModel, path: Path) -> Path:
    import matplotlib.pyplot as plt

    steps = [step for step in model.steps if step.thresholds]
    columns = 4
    rows = -(-len(steps) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.4 * rows))
    inference = CLASSES.index("inference")
    for axis, step in zip(np.atleast_1d(axes).flat, steps, strict=False):
        xs = np.linspace(*_natural_range(step.name, step.thresholds), 400)
        ys = [
            step.contribution(float(x))[TRAINING] - step.contribution(float(x))[inference]
            for x in xs
        ]
        axis.plot(xs, ys, color="tab:red", lw=1)
        axis.axhline(0, color="black", lw=0.5)
        axis.set_title(step.name, fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in list(np.atleast_1d(axes).flat)[len(steps) :]:
        axis.axis("off")
    figure.suptitle(
        f"{model.model_version}: push towards training (+) or inference (-) per feature",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
