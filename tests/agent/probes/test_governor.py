"""The duty-cycle governor, driven by a fake clock and a fake device."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.probes.governor import DutyCycleGovernor, GovernorPolicy, Verdict


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeDevice:
    """Contention source: the tenant's busy fraction per GPU, as a test sets it."""

    busy: dict[int, float | None] = field(default_factory=dict)

    def tenant_busy_frac(self, gpu_index: int) -> float | None:
        return self.busy.get(gpu_index)


POLICY = GovernorPolicy(budget_frac=0.01, horizon_s=100.0, min_interval_s=10.0)


def governor(clock: FakeClock, device: FakeDevice) -> DutyCycleGovernor:
    return DutyCycleGovernor(POLICY, clock=clock, contention=device)


def test_first_round_may_run() -> None:
    assert governor(FakeClock(), FakeDevice()).decide(0, 0.01) is Verdict.RUN


def test_rounds_are_spaced_by_the_minimum_interval() -> None:
    clock = FakeClock()
    gov = governor(clock, FakeDevice())
    gov.record(0, 0.001)
    clock.now += 9.0
    assert gov.decide(0) is Verdict.TOO_SOON
    clock.now += 1.0
    assert gov.decide(0) is Verdict.RUN


def test_probes_are_skipped_once_the_budget_is_used() -> None:
    clock = FakeClock()
    gov = governor(clock, FakeDevice())
    assert gov.budget_s == pytest.approx(1.0)  # 1 % of a 100 s horizon
    gov.record(0, 0.6)
    clock.now += 20.0
    assert gov.decide(0, expected_device_s=0.3) is Verdict.RUN
    gov.record(0, 0.3)
    clock.now += 20.0
    assert gov.decide(0, expected_device_s=0.3) is Verdict.BUDGET_USED


def test_budget_frees_up_as_rounds_leave_the_horizon() -> None:
    clock = FakeClock()
    gov = governor(clock, FakeDevice())
    gov.record(0, 0.9)
    clock.now += 50.0
    assert gov.decide(0, expected_device_s=0.3) is Verdict.BUDGET_USED
    clock.now += 51.0
    assert gov.used_s(0) == 0.0
    assert gov.decide(0, expected_device_s=0.3) is Verdict.RUN


def test_budgets_are_per_device() -> None:
    clock = FakeClock()
    gov = governor(clock, FakeDevice())
    gov.record(0, 1.0)
    assert gov.decide(0, 0.1) is not Verdict.RUN
    assert gov.decide(1, 0.1) is Verdict.RUN


def test_saturated_tenant_doubles_the_spacing_up_to_the_cap() -> None:
    clock = FakeClock()
    device = FakeDevice({0: 0.99})
    gov = governor(clock, device)
    for expected in (2, 4, 8, 16, 16):
        gov.record(0, 0.001)
        assert gov.backoff(0) == expected
    clock.now += POLICY.min_interval_s * 15
    assert gov.decide(0) is Verdict.TOO_SOON
    clock.now += POLICY.min_interval_s
    assert gov.decide(0) is Verdict.RUN


def test_backoff_resets_when_the_tenant_eases() -> None:
    clock = FakeClock()
    device = FakeDevice({0: 0.95})
    gov = governor(clock, device)
    gov.record(0, 0.001)
    gov.record(0, 0.001)
    assert gov.backoff(0) == 4
    device.busy[0] = 0.3
    gov.record(0, 0.001)
    assert gov.backoff(0) == 1


def test_unknown_load_does_not_back_off() -> None:
    gov = governor(FakeClock(), FakeDevice({0: None}))
    gov.record(0, 0.001)
    assert gov.backoff(0) == 1


BAD_POLICIES = [
    pytest.param({"budget_frac": 0.0}, id="no-budget"),
    pytest.param({"budget_frac": 1.5}, id="more-than-all-time"),
    pytest.param({"horizon_s": 0.0}, id="empty-horizon"),
    pytest.param({"min_interval_s": -1.0}, id="negative-interval"),
    pytest.param({"max_backoff": 0}, id="zero-backoff"),
]


@pytest.mark.parametrize("fields", BAD_POLICIES)
def test_invalid_policies_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        GovernorPolicy(**fields)  # type: ignore[arg-type]
