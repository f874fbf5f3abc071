"""Repeating a timing until its mean is known to the stated confidence."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.probes.confidence import RepeatPolicy, ci95_relative, repeat_until_confident, t95


class SteppingClock:
    """A monotonic clock that advances by ``step`` seconds per reading."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def timings(values: list[float]) -> Iterator[float]:
    yield from values
    while True:
        yield values[-1]


def test_identical_timings_are_confident_after_the_minimum() -> None:
    source = timings([1e-3])
    result = repeat_until_confident(lambda: next(source), RepeatPolicy(), SteppingClock(0.0))
    assert len(result.times_s) == RepeatPolicy().min_repeats
    assert result.ci95_rel == 0.0
    assert result.confident


def test_noisy_timings_stop_at_the_budget_without_confidence() -> None:
    values = [1e-3, 5e-3] * 50
    source = iter(values)
    policy = RepeatPolicy(min_repeats=3, max_repeats=64, budget_s=0.01)
    result = repeat_until_confident(lambda: next(source), policy, SteppingClock(0.001))
    assert 3 <= len(result.times_s) < 64
    assert not result.confident
    assert result.ci95_rel > policy.rel_half_width


def test_max_repeats_bounds_the_loop() -> None:
    values = [1e-3, 5e-3] * 50
    source = iter(values)
    policy = RepeatPolicy(min_repeats=2, max_repeats=5, budget_s=100.0)
    result = repeat_until_confident(lambda: next(source), policy, SteppingClock(0.0))
    assert len(result.times_s) == 5


def test_t95_matches_known_values() -> None:
    assert t95(1) == pytest.approx(12.706)
    assert t95(10) == pytest.approx(2.228)
    assert t95(1000) == pytest.approx(1.96)


def test_ci_is_unknown_with_one_sample() -> None:
    assert ci95_relative((1.0,)) == math.inf


BAD_POLICIES = [
    pytest.param({"min_repeats": 1}, id="one-repeat-gives-no-interval"),
    pytest.param({"min_repeats": 10, "max_repeats": 5}, id="min-above-max"),
    pytest.param({"rel_half_width": 0.0}, id="zero-width"),
    pytest.param({"budget_s": -1.0}, id="negative-budget"),
]


@pytest.mark.parametrize("fields", BAD_POLICIES)
def test_invalid_policies_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        RepeatPolicy(**fields)  # type: ignore[arg-type]


@given(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=2, max_size=50))
def test_ci_is_finite_and_non_negative_for_positive_timings(values: list[float]) -> None:
    ci = ci95_relative(tuple(values))
    assert math.isfinite(ci)
    assert ci >= 0.0


@given(
    st.lists(st.floats(min_value=1e-6, max_value=1e-2), min_size=1, max_size=80),
    st.floats(min_value=0.001, max_value=0.5),
)
def test_confident_means_the_target_was_met(values: list[float], width: float) -> None:
    source = timings(values)
    policy = RepeatPolicy(rel_half_width=width, budget_s=0.05)
    result = repeat_until_confident(lambda: next(source), policy, SteppingClock(0.001))
    assert result.confident == (result.ci95_rel <= width)
    assert policy.min_repeats <= len(result.times_s) <= policy.max_repeats
