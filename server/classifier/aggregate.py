"""From window verdicts to a recording's (or job's) verdict, with hysteresis.

A GPU raises a training alarm after ``persistence`` consecutive training windows and clears it
after ``persistence`` consecutive windows that are not training, so one odd window neither
raises nor clears an alarm. Windows are consecutive when one ends where the next starts; a
gap in the evidence breaks a run. A recording with fewer windows on a GPU than
``persistence`` needs all of them.

A recording is ``training`` when any GPU raised an alarm; else ``inference`` when any GPU
served in at least ``persistence`` windows (serving comes and goes with requests, so these
need not be consecutive, but one busy window alone is not enough); else ``idle``. GPUs that
sit idle beside busy ones are normal and change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import fmean

PERSISTENCE = 2
# Window edges closer than this are the same instant (float sums of 10 s steps).
_EDGE_TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class WindowVerdict:
    """One GPU window's verdict; times are seconds since the recording's first sample."""

    gpu: int
    start_s: float
    end_s: float
    label: str
    p_training: float
    confidence: float  # probability of ``label``


@dataclass(frozen=True)
class RecordingVerdict:
    """The verdict over all windows of a recording."""

    verdict: str
    confidence: float
    first_training_s: float | None  # end of the window that first raised a training alarm
    gpus: int


def alarm_states(
    windows: Sequence[WindowVerdict], active: Iterable[str], persistence: int = PERSISTENCE
) -> list[bool]:
    """Per window of one GPU (time order): is the alarm for ``active`` labels up after it?"""
    wanted = set(active)
    needed = max(1, min(persistence, len(windows)))
    states: list[bool] = []
    raised, hits, misses = False, 0, 0
    previous_end: float | None = None
    for window in windows:
        if previous_end is not None and abs(window.start_s - previous_end) > _EDGE_TOLERANCE_S:
            hits, misses = 0, 0  # a gap in the evidence: runs start again
        previous_end = window.end_s
        if window.label in wanted:
            hits, misses = hits + 1, 0
        else:
            hits, misses = 0, misses + 1
        if not raised and hits >= needed:
            raised = True
        elif raised and misses >= needed:
            raised = False
        states.append(raised)
    return states


def by_gpu(windows: Iterable[WindowVerdict]) -> dict[int, list[WindowVerdict]]:
    """Windows grouped per GPU, each group in time order."""
    groups: dict[int, list[WindowVerdict]] = {}
    for window in windows:
        groups.setdefault(window.gpu, []).append(window)
    return {gpu: sorted(group, key=lambda w: w.start_s) for gpu, group in sorted(groups.items())}


def recording_verdict(
    windows: Sequence[WindowVerdict], persistence: int = PERSISTENCE
) -> RecordingVerdict:
    """Aggregate a recording's window verdicts (see the module docstring)."""
    groups = by_gpu(windows)
    first_alarm: float | None = None
    training_support: list[float] = []
    serving_support: list[float] = []
    for group in groups.values():
        training = alarm_states(group, ("training",), persistence)
        if any(training):
            raised_at = group[training.index(True)].end_s
            first_alarm = raised_at if first_alarm is None else min(first_alarm, raised_at)
            training_support += [w.p_training for w in group if w.label == "training"]
        serving = [w.confidence for w in group if w.label != "idle"]
        if len(serving) >= max(1, min(persistence, len(group))):
            serving_support += serving
    if training_support:
        return RecordingVerdict("training", fmean(training_support), first_alarm, len(groups))
    if serving_support:
        return RecordingVerdict("inference", fmean(serving_support), None, len(groups))
    idle = [w.confidence for w in windows if w.label == "idle"] or [0.0]
    return RecordingVerdict("idle", fmean(idle), None, len(groups))
