"""Hysteresis: one odd window neither raises nor clears an alarm."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.classifier.aggregate import WindowVerdict, alarm_states, recording_verdict

P = {"training": 0.95, "inference": 0.1, "idle": 0.0}


def windows(labels: str, gpu: int = 0, start: float = 0.0) -> list[WindowVerdict]:
    """'T', 'I', '.' (idle) per 10 s window."""
    names = {"T": "training", "I": "inference", ".": "idle"}
    return [
        WindowVerdict(gpu, start + 10.0 * k, start + 10.0 * (k + 1), names[c], P[names[c]], 0.9)
        for k, c in enumerate(labels)
    ]


@pytest.mark.parametrize(
    ("labels", "verdict", "first_training_s"),
    [
        ("....", "idle", None),
        ("I...", "idle", None),
        ("I..I", "inference", None),
        ("ITIII", "inference", None),
        ("ITITI", "inference", None),
        ("ITTII", "training", 30.0),
        ("..TTT", "training", 40.0),
        ("T", "training", 10.0),
        ("I", "inference", None),
    ],
    ids=[
        "all-idle",
        "one-odd-busy-window",
        "serving-comes-and-goes",
        "one-odd-training-window",
        "alternating",
        "two-in-a-row",
        "late-start",
        "one-window-recording",
        "one-serving-window-recording",
    ],
)
def test_recording_verdicts(labels: str, verdict: str, first_training_s: float | None) -> None:
    result = recording_verdict(windows(labels))
    assert (result.verdict, result.first_training_s) == (verdict, first_training_s)


def test_one_odd_window_does_not_clear_a_raised_alarm() -> None:
    assert alarm_states(windows("TTITT"), ("training",)) == [False, True, True, True, True]
    assert alarm_states(windows("TTIIT"), ("training",)) == [False, True, True, False, False]


def test_a_gap_in_the_evidence_breaks_a_run() -> None:
    gapped = windows("T") + windows("T", start=30.0)
    assert not any(alarm_states(gapped, ("training",)))


def test_any_gpu_training_makes_the_recording_training() -> None:
    result = recording_verdict(windows("....") + windows(".TT.", gpu=3))
    assert result.verdict == "training"
    assert result.gpus == 2
    assert result.first_training_s == 30.0


@given(st.text(alphabet="I.", min_size=2, max_size=30), st.integers(0, 29))
def test_a_single_training_window_never_raises(labels: str, position: int) -> None:
    position %= len(labels)
    labels = labels[:position] + "T" + labels[position + 1 :]
    assert recording_verdict(windows(labels)).verdict != "training"


@given(st.integers(2, 8), st.text(alphabet="I.", min_size=2, max_size=12), st.integers(0, 11))
def test_one_odd_window_on_every_gpu_at_once_never_raises(
    gpus: int, labels: str, position: int
) -> None:
    """GPUs of a host do not corroborate each other within one window.

    Tensor-parallel serving moves its GPUs in lockstep, so one odd window shows on all of
    them at once (in the 5 s trial every training call on a TP2 serving log was on both
    GPUs): counting GPUs instead of windows would make one odd window an alarm.
    """
    position %= len(labels)
    labels = labels[:position] + "T" + labels[position + 1 :]
    host = [w for gpu in range(gpus) for w in windows(labels, gpu=gpu)]
    assert recording_verdict(host).verdict != "training"
