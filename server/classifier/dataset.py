"""Labelled recordings and their per-GPU windows, cut and featurised exactly as the agent does.

A data folder is ``../shared/data/telemetry`` or anything shaped like it: ``LABELS.csv``
(columns ``file,label,gpu,...``) names each recording's class; recordings under a top-level
``training/`` or ``inference/`` folder that LABELS.csv does not list take the folder's name as
their label. Only CSV logs are read (``*.csv``, ``*.csv.gz``); archives and notes are skipped.

Each window of a recording gets a ground truth of its own: a GPU that did nothing in a window
is ``idle`` whatever the recording is, a GPU busy for most of the window carries the
recording's label, and a window in between is ``mixed``: it counts for the recording's verdict
and its time to detect, but neither for fitting nor for window-level rates.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.collectors.replay import Recording, parse_recording
from agent.features import window_features
from agent.samples import GpuDescription, Tick
from agent.windows import Window, WindowAssembler

WINDOW_S = 10.0
LABELS_FILE = "LABELS.csv"
RECORDING_LABELS = ("training", "inference")
MIXED = "mixed"
# A GPU whose utilization exceeds this is doing work (nvidia-smi's idle readings are 0-8 %).
ACTIVE_UTIL_PCT = 10.0
# Share of a window's samples that must be active for the window to carry the recording's label.
ACTIVE_WINDOW_FRAC = 0.5
# At most this share active and the window is idle.
IDLE_WINDOW_FRAC = 0.05
_RECORDING_SUFFIXES = (".csv", ".csv.gz")
# LABELS.csv names the GPU loosely; the agent would report NVML's name. Both telemetry sources
# are SXM parts: the A100s draw up to 538 W and the H100s up to ~580 W and clock 1830 MHz,
# all beyond the PCIe parts' 300 W / 350 W / 1755 MHz limits.
_NVML_NAMES = {"A100 80GB": "NVIDIA A100-SXM4-80GB", "H100 80GB": "NVIDIA H100 80GB HBM3"}
# The first busy second opens the first run of this many seconds in which a GPU works.
_BUSY_RUN_S = 5


@dataclass(frozen=True)
class LabelledRecording:
    """One recording file with its known class and the GPU model it ran on ("" if unknown)."""

    path: Path
    label: str
    gpu_name: str

    @property
    def name(self) -> str:
        """A short unique name: the path below the data folder's class folder."""
        parts = self.path.parts
        for anchor in RECORDING_LABELS:
            if anchor in parts:
                return "/".join(parts[parts.index(anchor) :])
        return self.path.name


@dataclass(frozen=True)
class RecordingData:
    """A labelled recording's window rows and the second its GPUs first got busy."""

    name: str
    label: str
    rows: tuple[WindowRow, ...]
    first_busy_s: float | None
    gpu_name: str = ""


@dataclass(frozen=True)
class WindowRow:
    """One GPU's features over one window, with where it came from and its ground truth."""

    recording: str
    gpu: int
    start_s: float
    end_s: float
    features: dict[str, float]
    truth: str  # "training" | "inference" | "idle" | "mixed"
    label: str  # the recording's class: "training" | "inference"


def discover(data_dir: Path) -> list[LabelledRecording]:
    """Every CSV recording under ``data_dir`` with its label, sorted by path."""
    listed = _read_labels(data_dir / LABELS_FILE)
    found: list[LabelledRecording] = []
    for path in sorted(data_dir.rglob("*")):
        if not path.is_file() or not path.name.endswith(_RECORDING_SUFFIXES):
            continue
        relative = path.relative_to(data_dir).as_posix()
        if relative in listed:
            label, listed_gpu = listed[relative]
            gpu_name = _NVML_NAMES.get(listed_gpu, listed_gpu)
        else:
            label = next((c for c in RECORDING_LABELS if c in path.parts), "")
            gpu_name = ""
        if label in RECORDING_LABELS:
            found.append(LabelledRecording(path, label, gpu_name))
    return found


def _read_labels(path: Path) -> dict[str, tuple[str, str]]:
    """LABELS.csv rows by file path relative to the data folder.

    The shared LABELS.csv names files from the folder above it (``telemetry/training/...``);
    a leading component equal to the data folder's own name is therefore dropped.
    """
    if not path.is_file():
        return {}
    prefix = path.parent.name + "/"
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row["file"].removeprefix(prefix): (row["label"], row.get("gpu", ""))
            for row in csv.DictReader(handle)
        }


def rebased(recording: Recording) -> list[Tick]:
    """The recording's ticks with time counted from its first sample."""
    if not recording.ticks:
        return []
    origin = recording.ticks[0].t_unix_s
    return [Tick(tick.t_unix_s - origin, tick.samples) for tick in recording.ticks]


def cut_windows(ticks: Iterable[Tick], window_s: float = WINDOW_S) -> list[Window]:
    """Aligned windows of ``window_s`` over ``ticks``, the last partial one included."""
    assembler = WindowAssembler(window_s)
    windows = [window for tick in ticks for window in assembler.add(tick)]
    last = assembler.flush()
    return [*windows, last] if last is not None else windows


def subsample(ticks: Sequence[Tick], interval_s: float) -> list[Tick]:
    """The first tick of every ``interval_s`` slot: what a slower logger would have kept."""
    kept: list[Tick] = []
    last_slot: int | None = None
    for tick in ticks:
        slot = math.floor(tick.t_unix_s / interval_s + 1e-9)
        if slot != last_slot:
            kept.append(tick)
            last_slot = slot
    return kept


def gpu_descriptions(indices: Iterable[int], gpu_name: str) -> tuple[GpuDescription, ...]:
    """What the agent's collector would say about a recording's GPUs: index and model name."""
    return tuple(GpuDescription(index=index, name=gpu_name) for index in indices)


def window_rows(
    name: str,
    label: str,
    ticks: Sequence[Tick],
    gpus: Sequence[GpuDescription],
    window_s: float = WINDOW_S,
) -> Iterator[WindowRow]:
    """Featurise every GPU window of rebased ticks and give each its ground truth."""
    for window in cut_windows(ticks, window_s):
        per_gpu = window_features(window, gpus)
        for gpu, features in per_gpu.items():
            if gpu not in window.gpu_indices():
                continue
            yield WindowRow(
                recording=name,
                gpu=gpu,
                start_s=window.start_unix_s,
                end_s=window.end_unix_s,
                features=features,
                truth=window_truth(window, gpu, label),
                label=label,
            )


def window_truth(window: Window, gpu: int, label: str) -> str:
    """``label`` when the GPU was busy most of the window, ``idle`` when not at all, else mixed."""
    util = window.series(gpu).values.get("util_gpu_pct")
    if util is None or not np.any(np.isfinite(util)):
        return MIXED  # no utilization reading: nothing to judge the truth by
    readings = util[np.isfinite(util)]
    active = float(np.count_nonzero(readings > ACTIVE_UTIL_PCT)) / readings.size
    if active >= ACTIVE_WINDOW_FRAC:
        return label
    return "idle" if active <= IDLE_WINDOW_FRAC else MIXED


def first_busy_s(ticks: Sequence[Tick]) -> float | None:
    """Start of the first run of _BUSY_RUN_S whole seconds in which some GPU was active.

    A second is active when most of its ticks have some GPU above ACTIVE_UTIL_PCT, so a lone
    blip while a model loads does not count as the start of work.
    """
    if not ticks:
        return None
    seconds = np.floor([tick.t_unix_s for tick in ticks]).astype(np.int64)
    busy = np.array(
        [
            any(s.values.get("util_gpu_pct", 0.0) > ACTIVE_UTIL_PCT for s in tick.samples)
            for tick in ticks
        ],
        dtype=np.float64,
    )
    origin = int(seconds[0])
    counts = np.bincount(seconds - origin)
    hits = np.bincount(seconds - origin, weights=busy)
    active = (counts > 0) & (hits * 2 > counts)
    run = 0
    for second, is_active in enumerate(active):
        run = run + 1 if is_active else 0
        if run == _BUSY_RUN_S:
            return float(origin + second - _BUSY_RUN_S + 1)
    return None


def load_recording_data(
    item: LabelledRecording, interval_s: float | None = None, window_s: float = WINDOW_S
) -> RecordingData:
    """Parse, optionally subsample, cut and featurise one labelled recording."""
    recording = parse_recording(item.path)
    ticks = rebased(recording)
    name = item.name
    if interval_s is not None:
        ticks = subsample(ticks, interval_s)
        name = f"{name}@{interval_s * 1000:g}ms"
    gpus = gpu_descriptions(recording.gpu_indices, item.gpu_name)
    rows = tuple(window_rows(name, item.label, ticks, gpus, window_s))
    return RecordingData(name, item.label, rows, first_busy_s(ticks), item.gpu_name)
