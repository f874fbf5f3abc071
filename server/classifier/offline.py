"""Classify recorded telemetry offline, through the very code path the agent and verifier run.

recording -> ticks counted from the first sample -> windows of the model's length
(``agent.windows``; 10 s for the packaged model) -> the agent's features (``agent.features``)
-> the model, per GPU window -> the recording's verdict with hysteresis
(:mod:`server.classifier.aggregate`). A window length other than the model's is refused
(:class:`~server.classifier.model.WindowLengthError`).

Offline, only the registered features the model and the compute estimate read are computed
(the same functions the agent runs, so the values are identical); the agent computes them
all because the evidence it signs must serve future models too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.collectors.replay import Recording
from agent.features import FEATURES, FeatureFn, compute_features, window_features
from agent.samples import GpuDescription, Tick
from agent.windows import Window
from server.classifier.aggregate import RecordingVerdict, WindowVerdict, recording_verdict
from server.classifier.dataset import cut_windows, gpu_descriptions, rebased
from server.classifier.model import StumpModel


@dataclass(frozen=True)
class ClassifiedWindow:
    """A window verdict together with the features it was judged on."""

    verdict: WindowVerdict
    features: dict[str, float]


@dataclass(frozen=True)
class ClassifiedRecording:
    """Every GPU window's verdict and the recording's verdict."""

    windows: tuple[ClassifiedWindow, ...]
    result: RecordingVerdict
    duration_s: float


def classify_ticks(
    ticks: Sequence[Tick],
    model: StumpModel,
    gpus: Sequence[int],
    gpu_name: str = "",
    window_s: float | None = None,
) -> ClassifiedRecording:
    """Classify ticks already counted from the recording's first sample (t = 0).

    ``window_s`` defaults to the model's own window length; any other raises
    WindowLengthError.
    """
    if window_s is None:
        window_s = model.window_s
    model.check_window_s(window_s)
    duration_s = ticks[-1].t_unix_s if ticks else 0.0
    descriptions = gpu_descriptions(gpus, gpu_name)
    needed = needed_features(model)
    classified: list[ClassifiedWindow] = []
    for window in cut_windows(ticks, window_s):
        for gpu, features in _features(window, descriptions, needed).items():
            prediction = model.predict(features)
            start_s = max(0.0, window.start_unix_s)
            verdict = WindowVerdict(
                gpu=gpu,
                start_s=start_s,
                end_s=max(start_s, min(window.end_unix_s, duration_s)),
                label=prediction.label,
                p_training=prediction.p_training,
                confidence=prediction.confidence,
            )
            classified.append(ClassifiedWindow(verdict, features))
    result = recording_verdict([item.verdict for item in classified])
    return ClassifiedRecording(tuple(classified), result, duration_s)


# Read by the compute estimate (server.classifier.compute) besides the model's own features.
_COMPUTE_FEATURES = ("energy_j", "tensor_active_mean_pct", "sm_clock_mean_mhz")


def needed_features(model: StumpModel) -> Mapping[str, FeatureFn] | None:
    """The per-GPU features to compute, or None when the model reads host-wide features too."""
    names = (*model.feature_names, *_COMPUTE_FEATURES)
    if any(name not in FEATURES for name in model.feature_names):
        return None
    return {name: FEATURES[name] for name in names if name in FEATURES}


def _features(
    window: Window,
    descriptions: Sequence[GpuDescription],
    needed: Mapping[str, FeatureFn] | None,
) -> dict[int, dict[str, float]]:
    """Features of every GPU sampled in the window."""
    sampled = window.gpu_indices()
    if needed is None:
        every = window_features(window, descriptions)
        return {gpu: every[gpu] for gpu in sampled}
    by_index = {gpu.index: gpu for gpu in descriptions}
    return {
        gpu: compute_features(window.series(gpu), by_index.get(gpu, GpuDescription(gpu)), needed)
        for gpu in sampled
    }


def classify_recording(
    recording: Recording,
    model: StumpModel,
    gpu_name: str = "",
    window_s: float | None = None,
) -> ClassifiedRecording:
    """Classify a parsed recording; ``gpu_name`` is NVML's device name when known."""
    return classify_ticks(rebased(recording), model, recording.gpu_indices, gpu_name, window_s)
