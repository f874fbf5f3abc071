"""The duty-cycle governor: probes may use at most a set share of each device's time.

Two rules, per device:

* **budget**: the device time probes used within the last ``horizon_s`` seconds, plus what
  the next round is expected to use, must stay within ``budget_frac`` of that horizon
  (1 % by default: 6 s of a 10-minute horizon);
* **spacing and back-off**: rounds are at least ``min_interval_s`` apart. While the
  tenant saturates the device (its busy fraction at or above ``busy_threshold``) its
  kernels queue behind ours, so every round run under saturation doubles the spacing, up
  to ``max_backoff`` times; the first round on an unsaturated device resets it. Probes
  still run now and then under load, because the slowdown they suffer there is the
  contention signal.

Time and load come in through seams: a monotonic ``clock`` and a :class:`ContentionSource`
(in the daemon, the latest NVML utilization), so tests drive the governor with fakes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class ContentionSource(Protocol):
    """How busy the tenant keeps a device."""

    def tenant_busy_frac(self, gpu_index: int) -> float | None:
        """Recent fraction of time the tenant's kernels ran on the device; None if unknown."""
        ...


@dataclass(frozen=True)
class GovernorPolicy:
    """The limits the governor enforces."""

    budget_frac: float = 0.01
    horizon_s: float = 600.0
    min_interval_s: float = 60.0
    busy_threshold: float = 0.9
    max_backoff: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.budget_frac <= 1:
            raise ValueError("budget_frac must be in (0, 1]")
        if self.horizon_s <= 0 or self.min_interval_s < 0 or self.max_backoff < 1:
            raise ValueError("horizon_s must be > 0, min_interval_s >= 0 and max_backoff >= 1")


class Verdict(StrEnum):
    """Why a probe round may or may not run now."""

    RUN = "run"
    TOO_SOON = "too_soon"
    BUDGET_USED = "budget_used"


@dataclass
class _DeviceLedger:
    rounds: deque[tuple[float, float]] = field(default_factory=deque)  # (ended at, device s)
    last_round_at: float | None = None
    backoff: int = 1


class DutyCycleGovernor:
    """Decides, per device, whether a probe round may run now; records what rounds used."""

    def __init__(
        self, policy: GovernorPolicy, *, clock: Callable[[], float], contention: ContentionSource
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._contention = contention
        self._ledgers: dict[int, _DeviceLedger] = {}

    def decide(self, gpu_index: int, expected_device_s: float = 0.0) -> Verdict:
        """May a round expected to take ``expected_device_s`` of device time run now?"""
        ledger = self._ledger(gpu_index)
        now = self._clock()
        spacing = self._policy.min_interval_s * ledger.backoff
        if ledger.last_round_at is not None and now - ledger.last_round_at < spacing:
            return Verdict.TOO_SOON
        if self.used_s(gpu_index) + expected_device_s > self.budget_s:
            return Verdict.BUDGET_USED
        return Verdict.RUN

    def record(self, gpu_index: int, device_time_s: float) -> None:
        """Charge a finished (or failed) round; adjusts the back-off from the tenant's load."""
        ledger = self._ledger(gpu_index)
        now = self._clock()
        ledger.rounds.append((now, max(0.0, device_time_s)))
        ledger.last_round_at = now
        busy = self._contention.tenant_busy_frac(gpu_index)
        if busy is not None and busy >= self._policy.busy_threshold:
            ledger.backoff = min(ledger.backoff * 2, self._policy.max_backoff)
        else:
            ledger.backoff = 1

    @property
    def budget_s(self) -> float:
        """Device seconds probes may use per horizon."""
        return self._policy.budget_frac * self._policy.horizon_s

    def used_s(self, gpu_index: int) -> float:
        """Device seconds probes used on ``gpu_index`` within the horizon."""
        ledger = self._ledger(gpu_index)
        cutoff = self._clock() - self._policy.horizon_s
        while ledger.rounds and ledger.rounds[0][0] <= cutoff:
            ledger.rounds.popleft()
        return sum(seconds for _, seconds in ledger.rounds)

    def backoff(self, gpu_index: int) -> int:
        """Current multiplier of the spacing between rounds on ``gpu_index``."""
        return self._ledger(gpu_index).backoff

    def _ledger(self, gpu_index: int) -> _DeviceLedger:
        return self._ledgers.setdefault(gpu_index, _DeviceLedger())
