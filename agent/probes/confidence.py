"""Repeat a timed measurement until its mean is known to a stated confidence.

The stated confidence is the two-sided 95 % Student-t interval of the mean iteration
time: a probe stops once that interval's half-width is within ``rel_half_width`` of the
mean (default ±5 %), after at least ``min_repeats`` and at most ``max_repeats`` timings, or
when one more timing would take it past ``budget_s`` of wall time, whichever comes first.
Results say whether the target was met.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

# Two-sided 95 % critical values of Student's t for 1..30 degrees of freedom; beyond 30 the
# normal value is within 2 % of the exact one.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95 = 1.960


def t95(degrees_of_freedom: int) -> float:
    """Two-sided 95 % critical value of Student's t."""
    if degrees_of_freedom < 1:
        raise ValueError("a confidence interval needs at least two samples")
    if degrees_of_freedom <= len(_T95):
        return _T95[degrees_of_freedom - 1]
    return _Z95


def ci95_relative(samples: tuple[float, ...]) -> float:
    """Half-width of the 95 % confidence interval of the mean, relative to the mean.

    Infinite with fewer than two samples or a non-positive mean: nothing is known yet.
    """
    if len(samples) < 2:
        return math.inf
    mean = statistics.fmean(samples)
    if mean <= 0:
        return math.inf
    standard_error = statistics.stdev(samples) / math.sqrt(len(samples))
    return t95(len(samples) - 1) * standard_error / mean


@dataclass(frozen=True)
class RepeatPolicy:
    """When to stop repeating a timing."""

    min_repeats: int = 3
    max_repeats: int = 64
    rel_half_width: float = 0.05
    budget_s: float = 0.02

    def __post_init__(self) -> None:
        if not 2 <= self.min_repeats <= self.max_repeats:
            raise ValueError("need 2 <= min_repeats <= max_repeats")
        if self.rel_half_width <= 0 or self.budget_s <= 0:
            raise ValueError("rel_half_width and budget_s must be positive")


@dataclass(frozen=True)
class Repeats:
    """The timings one probe took, and what they say about the mean."""

    times_s: tuple[float, ...]
    ci95_rel: float
    confident: bool

    @property
    def mean_s(self) -> float:
        """Mean time of one iteration."""
        return statistics.fmean(self.times_s)

    @property
    def median_s(self) -> float:
        """Median time of one iteration (robust to the odd interrupt: used for latency)."""
        return statistics.median(self.times_s)


def repeat_until_confident(
    measure: Callable[[], float], policy: RepeatPolicy, clock: Callable[[], float]
) -> Repeats:
    """Call ``measure`` (it returns one iteration's time in seconds) until ``policy`` is met.

    ``clock`` is a monotonic wall clock in seconds that bounds the loop by ``budget_s``; the
    timings themselves come from ``measure`` (device events on a GPU).
    """
    started = clock()
    times: list[float] = []
    while len(times) < policy.max_repeats:
        times.append(measure())
        if len(times) < policy.min_repeats:
            continue
        if ci95_relative(tuple(times)) <= policy.rel_half_width:
            break
        # Stop before a timing that would overrun the budget, not after it.
        if clock() - started + statistics.fmean(times) > policy.budget_s:
            break
    samples = tuple(times)
    ci = ci95_relative(samples)
    return Repeats(samples, ci, ci <= policy.rel_half_width)
