"""Small labelled data sets built from the synthetic generators (clearly not real telemetry)."""

from __future__ import annotations

from agent.collectors.synthetic import TRACE_KINDS, TraceKind, generate_trace
from server.classifier.dataset import (
    RecordingData,
    first_busy_s,
    gpu_descriptions,
    rebased,
    window_rows,
)
from server.classifier.model import DEFAULT_WINDOW_S

H100_NAME = "NVIDIA H100 80GB HBM3"


def synthetic_recording(
    kind: TraceKind,
    seed: int,
    seconds: float = 40.0,
    gpus: int = 2,
    window_s: float = DEFAULT_WINDOW_S,
) -> RecordingData:
    """A synthetic recording cut and featurised like a real one.

    Idle traces are labelled as serving logs whose GPUs happened to do nothing, so they
    supply the idle windows a fit needs.
    """
    recording = generate_trace(kind, seed, gpus=gpus, seconds=seconds, interval_s=0.25)
    ticks = rebased(recording)
    label = "training" if kind == "training" else "inference"
    name = f"synthetic/{kind}-{seed}"
    descriptions = gpu_descriptions(range(gpus), H100_NAME)
    rows = tuple(window_rows(name, label, ticks, descriptions, window_s))
    return RecordingData(name, label, rows, first_busy_s(ticks), H100_NAME)


def synthetic_data(window_s: float = DEFAULT_WINDOW_S) -> list[RecordingData]:
    """Three recordings of each kind: enough for inner folds that see every class."""
    return [
        synthetic_recording(kind, seed, window_s=window_s)
        for kind in TRACE_KINDS
        for seed in (1, 2, 3)
    ]
