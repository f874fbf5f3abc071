"""FLOP estimates: known answers for both routes, and a band that always brackets the middle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.skus import sku_for
from server.classifier.compute import NO_ESTIMATE, sum_flop, window_flop

H100 = "NVIDIA H100 80GB HBM3"


def test_gpm_route_is_activity_times_peak_times_clock_ratio() -> None:
    sku = sku_for(H100)
    assert sku is not None
    features = {"tensor_active_mean_pct": 50.0, "sm_clock_mean_mhz": 990.0, "energy_j": 1.0}
    estimate = window_flop(features, 10.0, H100)
    busy_s = 0.5 * 0.5 * 10.0  # half the tensor pipe, half the boost clock, 10 s
    assert estimate.method == "gpm"
    assert estimate.mid == pytest.approx(busy_s * 989e12 * sku.achievable_matmul_frac)
    assert estimate.high == pytest.approx(busy_s * 1979e12)
    assert estimate.low < estimate.mid < estimate.high


def test_energy_route_uses_energy_above_idle() -> None:
    idle_only = window_flop({"energy_j": 70.0 * 10.0}, 10.0, H100)  # idle draw, 10 s
    busy = window_flop({"energy_j": 560.0 * 10.0}, 10.0, H100)
    assert idle_only.mid == 0.0
    assert busy.method == "energy"
    assert 0.0 < busy.low < busy.mid < busy.high <= 10.0 * 989e12


def test_an_unknown_gpu_gets_the_wider_generic_band() -> None:
    known = window_flop({"energy_j": 5000.0}, 10.0, H100)
    generic = window_flop({"energy_j": 5000.0}, 10.0, "")
    assert generic.method == "energy-generic"
    assert generic.high / generic.low > known.high / known.low


@pytest.mark.parametrize(
    ("features", "label", "method"),
    [({"energy_j": 5000.0}, "idle", "idle"), ({}, "training", "none")],
    ids=["idle-window", "nothing-to-go-on"],
)
def test_windows_without_arithmetic(features: dict[str, float], label: str, method: str) -> None:
    estimate = window_flop(features, 10.0, H100, label)
    assert (estimate.mid, estimate.method) == (0.0, method)


def test_estimates_add_up() -> None:
    one = window_flop({"energy_j": 5000.0}, 10.0, H100)
    total = sum_flop([one, one, NO_ESTIMATE])
    assert total.mid == pytest.approx(2 * one.mid)
    assert total.method == "energy"
    assert "FLOP" in total.describe()


@given(
    st.floats(0.0, 1e6), st.floats(0.1, 10.0), st.sampled_from([H100, "", "NVIDIA A100-SXM4-80GB"])
)
def test_the_band_always_brackets_the_middle(energy_j: float, duration_s: float, name: str) -> None:
    estimate = window_flop({"energy_j": energy_j}, duration_s, name)
    assert 0.0 <= estimate.low <= estimate.mid <= estimate.high
