"""Evasion transforms do what they claim to the telemetry (the suite's rates are in the docs)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.collectors.synthetic import generate_training_trace
from agent.samples import Tick
from server.classifier.dataset import rebased
from server.classifier.evasion import (
    FAMILIES,
    EvasionResult,
    attack,
    duty_cycle,
    evasion_report_markdown,
    idle_gaps,
    inference_bursts,
    partial_gpus,
    period_jitter,
    power_cap,
)
from server.classifier.model import load_packaged_model

TDP_W = 700.0


@pytest.fixture(scope="module")
def ticks() -> list[Tick]:
    return rebased(generate_training_trace(seed=4, gpus=4, seconds=60.0, interval_s=0.1))


def column(ticks: list[Tick], name: str) -> np.ndarray:
    return np.array([[s.values[name] for s in tick.samples] for tick in ticks])


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_power_cap_clips_power_and_leaves_utilization(ticks: list[Tick]) -> None:
    capped = power_cap(ticks, rng(), 0.3, TDP_W)
    assert column(capped, "power_w").max() <= 0.3 * TDP_W
    assert np.array_equal(column(capped, "util_gpu_pct"), column(ticks, "util_gpu_pct"))


@pytest.mark.parametrize("share", [0.2, 0.5], ids=["20pct", "50pct"])
def test_idle_gaps_idle_about_the_requested_share(ticks: list[Tick], share: float) -> None:
    changed = idle_gaps(ticks, rng(), share, TDP_W)
    idle = (column(changed, "util_gpu_pct") == 0.0).all(axis=1).mean()
    assert idle == pytest.approx(share, abs=0.2)


def test_duty_cycle_idles_the_off_share_of_every_cycle(ticks: list[Tick]) -> None:
    changed = duty_cycle(ticks, rng(), 0.5, TDP_W)
    idle = (column(changed, "util_gpu_pct") == 0.0).all(axis=1).mean()
    assert idle == pytest.approx(0.5, abs=0.1)


def test_period_jitter_keeps_the_samples_and_their_order(ticks: list[Tick]) -> None:
    changed = period_jitter(ticks, rng(), 0.5, TDP_W)
    times = np.array([tick.t_unix_s for tick in changed])
    assert len(changed) == len(ticks)
    assert np.all(np.diff(times) > 0)
    assert [t.samples for t in changed] == [t.samples for t in ticks]
    assert not np.allclose(times, [tick.t_unix_s for tick in ticks])


def test_inference_bursts_change_only_part_of_the_time(ticks: list[Tick]) -> None:
    changed = inference_bursts(ticks, rng(), 0.3, TDP_W)
    touched = (column(changed, "power_w") != column(ticks, "power_w")).any(axis=1).mean()
    assert 0.1 < touched < 0.6


def test_inference_bursts_hold_a_steady_level_within_a_burst(ticks: list[Tick]) -> None:
    """Serving utilization is steady between arrivals; i.i.d. per-sample noise would not be."""
    changed = column(inference_bursts(ticks, rng(), 0.5, TDP_W), "util_gpu_pct")
    original = column(ticks, "util_gpu_pct")
    touched = (changed != original).any(axis=1)
    steps = np.abs(np.diff(changed[:, 0]))[touched[1:] & touched[:-1]]
    # Within a burst the reading moves by at most 2 points; bigger steps are burst edges.
    assert np.mean(steps <= 2.0) > 0.9


def test_partial_gpus_leave_the_chosen_share_working(ticks: list[Tick]) -> None:
    changed = partial_gpus(ticks, rng(), 0.25, TDP_W)
    working = (column(changed, "util_gpu_pct") > 0).any(axis=0)
    assert working.sum() == 1


def test_an_attack_is_classified_end_to_end(ticks: list[Tick]) -> None:
    held = attack(
        "synthetic/training:idle_gaps",
        "training",
        ticks,
        "NVIDIA H100 80GB HBM3",
        load_packaged_model(),
    )
    assert held.verdict in ("training", "inference", "idle")
    assert len(held.labels) == 4 * 6  # 4 GPUs x 6 windows


def test_every_family_is_reported() -> None:
    results = [
        EvasionResult(f.name, s, f.strength_meaning, 4, 3, 0.5)
        for f in FAMILIES
        for s in f.strengths
    ]
    table = evasion_report_markdown(results)
    for family in FAMILIES:
        assert family.name in table
    assert "3/4 (75 %)" in table
