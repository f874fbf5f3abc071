"""Tests for agent.features on small synthetic signals with known answers."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import features as features_module
from agent.features import (
    FEATURES,
    FeatureFn,
    FeatureNameError,
    compute_features,
    host_features,
    register_feature,
    window_features,
)
from agent.samples import GpuDescription, GpuSample, Tick
from agent.windows import GpuSeries, Window
from proto.errors import GpuattestError

GPU = GpuDescription(index=0)
INITIAL_FEATURES = {
    "sample_count",
    "coverage_frac",
    "util_gpu_mean_pct",
    "util_gpu_std_pct",
    "util_gpu_p10_pct",
    "util_gpu_p90_pct",
    "busy_frac",
    "idle_frac",
    "power_mean_w",
    "power_std_w",
    "power_p90_w",
    "power_max_w",
    "power_frac_of_limit",
    "energy_j",
    "mem_used_mean_mib",
    "mem_used_slope_mib_per_s",
    "sm_clock_mean_mhz",
    "util_mem_mean_pct",
    "power_dominant_period_s",
    "power_periodicity",
    "sm_active_mean_pct",
    "tensor_active_mean_pct",
    "dram_bw_mean_pct",
}
# Issue 3: features on the common 0.5 s grid (names stable from here on).
GRID_FEATURES = {
    "util_saturated_frac",
    "util_active_mean_pct",
    "util_busy_cold_frac",
    "power_rel_spread_frac",
    "power_rel_rough_frac",
    "power_rel_peak_frac",
    "power_tdp_frac",
    "power_rhythm_periodicity",
    # Model v2: how utilization moves while busy, pinned-but-warm utilization.
    "util_busy_jitter_frac",
    "util_busy_mad_pct",
    "util_saturated_warm_frac",
}
ALL_FEATURES = INITIAL_FEATURES | GRID_FEATURES
H100 = GpuDescription(index=0, name="NVIDIA H100 80GB HBM3", power_limit_w=700.0)


def ten_hz(seconds: float = 10.0) -> np.ndarray:
    """Sample times 0, 0.1, ... within ``seconds``."""
    return np.arange(round(seconds * 10)) * 0.1


def series_of(t: np.ndarray, duration_s: float = 10.0, **fields: object) -> GpuSeries:
    """A GpuSeries with the given columns (scalars are broadcast over ``t``)."""
    times = np.asarray(t, dtype=np.float64)
    values = {
        name: np.broadcast_to(np.asarray(column, dtype=np.float64), times.shape).copy()
        for name, column in fields.items()
    }
    return GpuSeries(start_unix_s=0.0, duration_s=duration_s, t=times, values=values)


# --- registry and compute_features ----------------------------------------------------------


def test_registry_holds_the_initial_and_grid_feature_sets() -> None:
    assert set(FEATURES) == ALL_FEATURES


def test_a_full_series_yields_every_feature_sorted_and_finite() -> None:
    t = ten_hz()
    series = series_of(
        t,
        power_w=300 + 40 * np.sin(2 * np.pi * t / 1.5),
        energy_mj=1e6 + 300_000 * t,
        util_gpu_pct=100.0,
        util_mem_pct=40.0,
        mem_used_mib=20_000.0,
        sm_clock_mhz=1980.0,
        sm_active_pct=80.0,
        tensor_active_pct=55.0,
        dram_bw_pct=30.0,
    )
    result = compute_features(series, H100)

    assert set(result) == ALL_FEATURES
    assert list(result) == sorted(result)
    assert all(math.isfinite(v) for v in result.values())


def test_compute_features_drops_none_and_non_finite_values_and_sorts() -> None:
    custom: dict[str, FeatureFn] = {
        "zeta": lambda s, g: 1.0,
        "alpha": lambda s, g: 2.0,
        "missing": lambda s, g: None,
        "not_a_number": lambda s, g: math.nan,
        "infinite": lambda s, g: math.inf,
    }
    result = compute_features(series_of(ten_hz()), GPU, custom)
    assert list(result.items()) == [("alpha", 2.0), ("zeta", 1.0)]


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(features_module._REGISTRY)
    yield
    features_module._REGISTRY.clear()
    features_module._REGISTRY.update(saved)


@pytest.mark.usefixtures("restore_registry")
def test_a_registered_feature_is_computed_without_touching_the_pipeline() -> None:
    @register_feature("tick_count_squared")
    def _squared(series: GpuSeries, gpu: GpuDescription) -> float | None:
        return float(series.sample_count**2)

    assert compute_features(series_of(ten_hz(1.0)), GPU)["tick_count_squared"] == 100.0


@pytest.mark.parametrize(
    "name",
    ["", "Power_W", "9lives", "power-w", "power w", "power_mean_w"],
    ids=["empty", "upper-case", "leading-digit", "dash", "space", "duplicate"],
)
def test_bad_feature_names_are_refused(name: str) -> None:
    with pytest.raises(FeatureNameError):
        register_feature(name)
    assert issubclass(FeatureNameError, GpuattestError)


# --- known answers ----------------------------------------------------------------------------


def test_a_constant_signal_has_no_spread_and_no_rhythm() -> None:
    result = compute_features(series_of(ten_hz(), util_gpu_pct=80.0, power_w=250.0), GPU)

    assert result["util_gpu_std_pct"] == 0.0
    assert result["util_gpu_p10_pct"] == result["util_gpu_p90_pct"] == 80.0
    assert result["power_std_w"] == 0.0
    assert result["power_max_w"] == result["power_p90_w"] == 250.0
    assert result["power_periodicity"] == 0.0
    assert "power_dominant_period_s" not in result


@pytest.mark.parametrize(
    ("period_s", "interval_s"),
    [(0.5, 0.1), (1.3, 0.1), (2.0, 0.1), (3.7, 0.1), (1.5, 0.25), (2.2, 0.05)],
    ids=["0.5s@10Hz", "1.3s@10Hz", "2s@10Hz", "3.7s@10Hz", "1.5s@4Hz", "2.2s@20Hz"],
)
def test_the_dominant_period_of_a_sine_is_its_period(period_s: float, interval_s: float) -> None:
    t = np.arange(0.0, 10.0, interval_s)
    ramp = 2.0 * t  # a slow drift must not hide the rhythm
    power = 300.0 + 50.0 * np.sin(2 * np.pi * t / period_s) + ramp
    result = compute_features(series_of(t, power_w=power), GPU)

    assert result["power_dominant_period_s"] == pytest.approx(period_s, rel=0.03)
    assert 0.5 < result["power_periodicity"] <= 1.0


def test_noise_has_weak_periodicity() -> None:
    t = ten_hz()
    noise = np.random.default_rng(7).normal(300.0, 20.0, t.size)
    assert compute_features(series_of(t, power_w=noise), GPU)["power_periodicity"] < 0.5


def test_energy_of_constant_100_w_over_10_s_from_the_counter() -> None:
    t = ten_hz()
    result = compute_features(series_of(t, energy_mj=5e6 + 100.0 * 1000.0 * t), GPU)
    assert result["energy_j"] == pytest.approx(1000.0, rel=1e-9)


def test_energy_of_constant_100_w_over_10_s_from_power() -> None:
    result = compute_features(series_of(ten_hz(), power_w=100.0), GPU)
    assert result["energy_j"] == pytest.approx(1000.0, rel=1e-9)


def test_energy_prefers_the_counter_over_power() -> None:
    t = ten_hz()
    series = series_of(t, power_w=100.0, energy_mj=200.0 * 1000.0 * t)
    assert compute_features(series, GPU)["energy_j"] == pytest.approx(2000.0)


def test_energy_falls_back_to_power_when_the_counter_was_reset() -> None:
    t = ten_hz()
    counter = np.where(t < 5.0, 9e6 + 100_000.0 * t, 100_000.0 * (t - 5.0))
    series = series_of(t, power_w=100.0, energy_mj=counter)
    assert compute_features(series, GPU)["energy_j"] == pytest.approx(1000.0)


def test_consecutive_windows_add_up_to_the_total_energy() -> None:
    t = np.arange(0.0, 30.0, 0.1)
    power = 200.0 + 100.0 * np.sin(t)
    total_j = float(np.sum(power) * 0.1)  # each sample stands for one interval
    parts = [
        compute_features(series_of(t[k : k + 100] - t[k], power_w=power[k : k + 100]), GPU)
        for k in (0, 100, 200)
    ]
    assert sum(p["energy_j"] for p in parts) == pytest.approx(total_j, rel=0.01)


@pytest.mark.parametrize("slope", [50.0, -120.0, 0.0], ids=["growing", "freeing", "flat"])
def test_memory_slope_of_a_linear_ramp(slope: float) -> None:
    t = ten_hz()
    result = compute_features(series_of(t, mem_used_mib=40_000.0 + slope * t), GPU)

    assert result["mem_used_slope_mib_per_s"] == pytest.approx(slope, abs=1e-9)
    assert result["mem_used_mean_mib"] == pytest.approx(40_000.0 + slope * 4.95)


def test_busy_and_idle_fractions() -> None:
    util = [0.0, 3.0, 5.0, 6.0, 49.0, 50.0, 80.0, 100.0]
    result = compute_features(series_of(np.arange(8) * 0.1, util_gpu_pct=util), GPU)

    assert result["busy_frac"] == 3 / 8
    assert result["idle_frac"] == 3 / 8
    assert result["util_gpu_mean_pct"] == pytest.approx(np.mean(util))
    assert result["util_gpu_p10_pct"] == pytest.approx(np.percentile(util, 10))
    assert result["util_gpu_p90_pct"] == pytest.approx(np.percentile(util, 90))
    assert result["util_gpu_std_pct"] == pytest.approx(np.std(util))


def test_power_as_a_fraction_of_the_limit_needs_a_known_limit() -> None:
    series = series_of(ten_hz(), power_w=100.0)
    assert compute_features(series, GpuDescription(0, power_limit_w=400.0))[
        "power_frac_of_limit"
    ] == pytest.approx(0.25)
    assert "power_frac_of_limit" not in compute_features(series, GpuDescription(0))


def test_averaged_power_is_used_only_when_instantaneous_power_is_missing() -> None:
    t = ten_hz()
    assert compute_features(series_of(t, power_avg_w=120.0), GPU)["power_mean_w"] == 120.0
    both = series_of(t, power_w=90.0, power_avg_w=120.0)
    assert compute_features(both, GPU)["power_mean_w"] == 90.0


def test_means_of_clock_memory_activity_and_gpm_fields() -> None:
    series = series_of(
        ten_hz(),
        sm_clock_mhz=1410.0,
        util_mem_pct=35.0,
        sm_active_pct=70.0,
        tensor_active_pct=45.0,
        dram_bw_pct=20.0,
    )
    result = compute_features(series, GPU)
    assert result["sm_clock_mean_mhz"] == 1410.0
    assert result["util_mem_mean_pct"] == 35.0
    assert (result["sm_active_mean_pct"], result["tensor_active_mean_pct"]) == (70.0, 45.0)
    assert result["dram_bw_mean_pct"] == 20.0


@pytest.mark.parametrize(
    ("t", "duration_s", "expected"),
    [
        (ten_hz(), 10.0, 1.0),
        (ten_hz(5.0), 10.0, 0.5),
        (np.concatenate([ten_hz(2.0), 8.0 + ten_hz(2.0)]), 10.0, 0.4),
    ],
    ids=["full", "first-half", "stall-in-the-middle"],
)
def test_coverage_fraction(t: np.ndarray, duration_s: float, expected: float) -> None:
    result = compute_features(series_of(t, duration_s, power_w=1.0), GPU)
    assert result["coverage_frac"] == pytest.approx(expected)


# --- missing and degenerate input -------------------------------------------------------------


def test_missing_fields_make_features_absent_not_nan() -> None:
    result = compute_features(series_of(ten_hz(), util_gpu_pct=60.0), GPU)

    assert not any(name.startswith(("power_", "mem_", "sm_", "tensor_")) for name in result)
    assert "energy_j" not in result
    assert "dram_bw_mean_pct" not in result
    assert result["util_gpu_mean_pct"] == 60.0


def test_an_all_nan_series_yields_only_counting_features() -> None:
    t = ten_hz()
    nan = np.full(t.size, np.nan)
    series = series_of(t, power_w=nan, util_gpu_pct=nan, energy_mj=nan, mem_used_mib=nan)
    result = compute_features(series, GPU)

    assert result == {"coverage_frac": pytest.approx(1.0), "sample_count": 100.0}


def test_a_single_sample() -> None:
    series = series_of(np.array([3.0]), util_gpu_pct=42.0, power_w=150.0, mem_used_mib=10.0)
    result = compute_features(series, GPU)

    assert result["sample_count"] == 1.0
    assert (result["util_gpu_mean_pct"], result["util_gpu_std_pct"]) == (42.0, 0.0)
    assert result["power_max_w"] == 150.0
    for needs_several in (
        "coverage_frac",
        "energy_j",
        "mem_used_slope_mib_per_s",
        "power_dominant_period_s",
        "power_periodicity",
    ):
        assert needs_several not in result


def test_an_empty_series_only_counts_zero_samples() -> None:
    assert compute_features(series_of(np.empty(0)), GPU) == {"sample_count": 0.0}


def test_physically_impossible_readings_are_ignored() -> None:
    series = series_of(
        np.arange(3) * 0.1, util_gpu_pct=[50.0, 150.0, -3.0], power_w=[-5.0, -1.0, 1e9]
    )
    result = compute_features(series, GPU)

    assert result["util_gpu_mean_pct"] == 50.0
    assert "power_mean_w" not in result


def test_too_few_samples_for_a_rhythm() -> None:
    result = compute_features(series_of(np.arange(5) * 0.1, power_w=[1.0, 5.0, 1.0, 5.0, 1.0]), GPU)
    assert "power_periodicity" not in result


# --- properties over arbitrary input ------------------------------------------------------------

FIELDS = [
    "power_w",
    "power_avg_w",
    "energy_mj",
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_mib",
    "sm_clock_mhz",
    "sm_active_pct",
    "tensor_active_pct",
    "dram_bw_pct",
]
ANY_READING = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
ANY_PLAUSIBLE_READING = st.one_of(st.none(), st.floats(min_value=0.0, max_value=100.0))
MEAN_SOURCES = {
    "util_gpu_mean_pct": ("util_gpu_pct",),
    "power_mean_w": ("power_w", "power_avg_w"),
    "sm_active_mean_pct": ("sm_active_pct",),
    "mem_used_mean_mib": ("mem_used_mib",),
}


@st.composite
def arbitrary_series(draw: st.DrawFn, reading: st.SearchStrategy[float | None]) -> GpuSeries:
    duration_s = draw(st.sampled_from([0.5, 1.0, 10.0]))
    times = sorted(
        draw(
            st.lists(st.floats(min_value=0.0, max_value=duration_s, exclude_max=True), max_size=60)
        )
    )
    fields = draw(st.lists(st.sampled_from(FIELDS), unique=True))
    values = {
        name: [
            math.nan if v is None else v
            for v in draw(st.lists(reading, min_size=len(times), max_size=len(times)))
        ]
        for name in fields
    }
    return series_of(np.array(times), duration_s, **values)


def assert_physically_ranged(result: Mapping[str, float], series: GpuSeries) -> None:
    assert all(math.isfinite(v) for v in result.values())
    assert result["sample_count"] == series.sample_count
    for name, value in result.items():
        if name.endswith("_pct"):
            assert 0.0 <= value <= 100.0, name
        elif name in {"coverage_frac", "busy_frac", "idle_frac", "power_periodicity"}:
            assert 0.0 <= value <= 1.0, name
        elif name != "mem_used_slope_mib_per_s":
            assert value >= 0.0, name
    if "power_dominant_period_s" in result:
        assert 0.2 <= result["power_dominant_period_s"] <= series.duration_s / 2


@pytest.mark.filterwarnings("error")  # no overflow or invalid-value warnings either
@settings(max_examples=300, deadline=None)
@given(series=arbitrary_series(ANY_READING), power_limit_w=st.floats(allow_nan=False))
def test_arbitrary_finite_input_never_raises_and_gives_finite_ranged_values(
    series: GpuSeries, power_limit_w: float
) -> None:
    result = compute_features(series, GpuDescription(0, power_limit_w=power_limit_w))
    assert_physically_ranged(result, series)


@pytest.mark.filterwarnings("error")
@settings(max_examples=200, deadline=None)
@given(series=arbitrary_series(ANY_PLAUSIBLE_READING))
def test_plausible_input_keeps_its_features(series: GpuSeries) -> None:
    result = compute_features(series, GpuDescription(0, power_limit_w=300.0))
    assert_physically_ranged(result, series)
    for feature, sources in MEAN_SOURCES.items():
        has_reading = any(
            name in series.values and np.any(np.isfinite(series.values[name])) for name in sources
        )
        assert (feature in result) == has_reading, feature


# --- cross-GPU features ---------------------------------------------------------------------


def host_window(power_by_gpu: dict[int, list[float | None]], util: float = 100.0) -> Window:
    """A 10 Hz window in which each GPU has the given power readings (None: not read)."""
    ticks = []
    for i in range(max(len(p) for p in power_by_gpu.values())):
        samples = []
        for gpu, power in power_by_gpu.items():
            values = {"util_gpu_pct": util}
            reading = power[i] if i < len(power) else None
            if reading is not None:
                values["power_w"] = reading
            samples.append(GpuSample(gpu, values))
        ticks.append(Tick(1000.0 + 0.1 * i, tuple(samples)))
    return Window(1000.0, 1010.0, tuple(ticks))


def described(*indices: int) -> list[GpuDescription]:
    return [GpuDescription(index=i) for i in indices]


def test_lockstep_of_in_phase_and_anti_phase_gpus() -> None:
    wave = 300.0 + 50.0 * np.sin(np.arange(100) * 0.4)
    window = host_window({0: list(wave), 1: list(wave * 1.1), 2: list(600.0 - wave)})
    result = host_features(window, described(0, 1, 2))

    assert result[0]["power_lockstep_corr"] == pytest.approx(0.0, abs=1e-9)
    assert result[1]["power_lockstep_corr"] == pytest.approx(0.0, abs=1e-9)
    assert result[2]["power_lockstep_corr"] == pytest.approx(-1.0)
    # Constant utilization has no variation to correlate.
    assert all("util_gpu_lockstep_corr" not in r for r in result.values())


def test_lockstep_uses_the_ticks_both_gpus_have() -> None:
    wave = list(300.0 + 50.0 * np.sin(np.arange(40) * 0.5))
    gappy: list[float | None] = [None if i % 3 == 0 else v for i, v in enumerate(wave)]
    result = host_features(host_window({0: wave, 1: gappy}), described(0, 1))
    assert result[0]["power_lockstep_corr"] == pytest.approx(1.0)
    assert result[1]["power_lockstep_corr"] == pytest.approx(1.0)


def test_lockstep_needs_enough_common_ticks() -> None:
    result = host_features(host_window({0: [1.0, 2.0, 3.0], 1: [2.0, 4.0, 7.0]}), described(0, 1))
    assert result == {0: {}, 1: {}}


def test_lockstep_of_a_single_gpu_is_empty() -> None:
    window = host_window({0: list(np.arange(20.0)), 1: list(np.arange(20.0))})
    assert host_features(window, described(0)) == {0: {}}


def test_lockstep_ignores_gpus_that_are_not_described() -> None:
    wave = list(300.0 + 50.0 * np.sin(np.arange(50) * 0.4))
    window = host_window({0: wave, 1: wave, 5: [600.0 - v for v in wave]})
    result = host_features(window, described(0, 1, 3))

    assert result[0]["power_lockstep_corr"] == pytest.approx(1.0)
    assert result[3] == {}


@pytest.mark.filterwarnings("error")
@settings(max_examples=150, deadline=None)
@given(readings=st.lists(st.lists(ANY_READING, min_size=3, max_size=3), min_size=0, max_size=30))
def test_lockstep_is_a_correlation_for_arbitrary_input(
    readings: list[list[float | None]],
) -> None:
    power = {gpu: [row[gpu] for row in readings] for gpu in range(3)}
    window = host_window(power) if readings else Window(0.0, 1.0, ())
    for per_gpu in host_features(window, described(0, 1, 2)).values():
        for value in per_gpu.values():
            assert -1.0 <= value <= 1.0


def test_window_features_merges_per_gpu_and_host_features_for_every_gpu() -> None:
    wave = list(300.0 + 50.0 * np.sin(np.arange(100) * 0.4))
    window = host_window({0: wave, 1: wave, 4: wave})
    result = window_features(window, described(0, 1, 2))

    assert sorted(result) == [0, 1, 2, 4]
    assert result[0]["power_lockstep_corr"] == pytest.approx(1.0)
    assert result[0]["sample_count"] == 100.0
    assert result[2] == {"sample_count": 0.0}
    assert result[4]["power_lockstep_corr"] == pytest.approx(1.0)
    assert all(list(r) == sorted(r) for r in result.values())


# --- features on the common grid (known answers) -------------------------------------------------


def grid_result(t: np.ndarray, gpu: GpuDescription = H100, **fields: object) -> dict[str, float]:
    """compute_features of a 10 s window with the given columns."""
    return compute_features(series_of(t, 10.0, **fields), gpu)


@pytest.mark.parametrize(
    ("util", "expected"),
    [(100.0, 1.0), (98.0, 1.0), (97.0, 0.0), (0.0, 0.0)],
    ids=["pinned", "98-counts", "97-does-not", "idle"],
)
def test_saturated_fraction_of_a_constant_utilization(util: float, expected: float) -> None:
    assert grid_result(ten_hz(), util_gpu_pct=util)["util_saturated_frac"] == expected


def test_saturated_fraction_of_a_half_pinned_window_is_a_half() -> None:
    t = ten_hz()
    result = grid_result(t, util_gpu_pct=np.where(t < 5.0, 100.0, 60.0))
    assert result["util_saturated_frac"] == pytest.approx(0.5, abs=0.05)
    assert result["util_active_mean_pct"] == pytest.approx(80.0, abs=2.0)


def test_active_mean_ignores_idle_moments_and_is_absent_when_all_idle() -> None:
    t = ten_hz()
    assert grid_result(t, util_gpu_pct=np.where(t < 5.0, 0.0, 90.0))["util_active_mean_pct"] == 90.0
    assert "util_active_mean_pct" not in grid_result(t, util_gpu_pct=0.0)


def test_a_square_wave_has_the_spread_and_peak_of_its_levels() -> None:
    t = ten_hz()
    # 4 s low, 6 s high: the 1 s smoothing only blurs the single edge.
    result = grid_result(t, power_w=np.where(t < 4.0, 100.0, 300.0))
    assert result["power_rel_spread_frac"] == pytest.approx(200.0 / 300.0, abs=0.01)
    assert result["power_rel_peak_frac"] == pytest.approx(0.0, abs=1e-9)  # median = max


def test_a_flat_window_has_no_spread_roughness_or_rhythm() -> None:
    result = grid_result(ten_hz(), power_w=250.0, util_gpu_pct=100.0)
    assert result["power_rel_spread_frac"] == 0.0
    assert result["power_rel_rough_frac"] == 0.0
    assert result["power_rhythm_periodicity"] == 0.0


def test_one_short_peak_stands_out_of_a_flat_window() -> None:
    t = ten_hz()
    power = np.where((t >= 5.0) & (t < 5.5), 500.0, 250.0)  # half a second at twice the level
    result = grid_result(t, power_w=power)
    # Smoothed over 1 s the peak reaches (250 + 500) / 2 = 375 W.
    assert result["power_rel_peak_frac"] == pytest.approx((375.0 - 250.0) / 375.0, abs=0.02)


def test_alternating_levels_every_grid_step_are_maximally_rough() -> None:
    t = ten_hz()
    power = np.where(np.floor(t).astype(int) % 2 == 0, 100.0, 300.0)  # 1 s on, 1 s off
    assert grid_result(t, power_w=power)["power_rel_rough_frac"] > 0.3


def test_a_2_s_rhythm_is_periodic_and_noise_is_not() -> None:
    t = ten_hz()
    rhythm = grid_result(t, power_w=400.0 + 100.0 * np.sin(2 * np.pi * t / 2.0))
    noise = grid_result(t, power_w=np.random.default_rng(3).normal(400.0, 50.0, t.size))
    assert rhythm["power_rhythm_periodicity"] > 0.5
    assert noise["power_rhythm_periodicity"] < rhythm["power_rhythm_periodicity"]


def test_power_as_a_fraction_of_tdp_needs_a_known_sku_and_is_capped_at_one() -> None:
    t = ten_hz()
    assert grid_result(t, power_w=350.0)["power_tdp_frac"] == pytest.approx(0.5)
    assert grid_result(t, power_w=900.0)["power_tdp_frac"] == 1.0
    assert "power_tdp_frac" not in grid_result(t, GPU, power_w=350.0)


@pytest.mark.parametrize(
    ("util", "power", "expected"),
    [(100.0, 150.0, 1.0), (100.0, 500.0, 0.0), (20.0, 150.0, 0.0)],
    ids=["spinning", "working", "idle-ish"],
)
def test_busy_but_cold_is_high_utilization_at_low_power(
    util: float, power: float, expected: float
) -> None:
    result = grid_result(ten_hz(), util_gpu_pct=util, power_w=power)
    assert result["util_busy_cold_frac"] == expected


def test_busy_cold_needs_a_known_sku() -> None:
    assert "util_busy_cold_frac" not in grid_result(ten_hz(), GPU, util_gpu_pct=100.0, power_w=1.0)


def test_a_stall_longer_than_the_hold_leaves_grid_points_empty() -> None:
    t = np.concatenate([np.arange(0.0, 3.0, 0.1), np.arange(8.0, 10.0, 0.1)])
    result = grid_result(t, util_gpu_pct=100.0)
    # Points 3.5 .. 7.5 s hold nothing (last reading at 2.9 s is > 1 s old); the rest is pinned.
    assert result["util_saturated_frac"] == 1.0


def test_grid_features_need_a_few_grid_points() -> None:
    t = np.arange(0.0, 1.0, 0.1)  # one second of samples: two grid points
    result = grid_result(t, util_gpu_pct=100.0, power_w=300.0)
    assert not GRID_FEATURES & set(result)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    level=st.floats(100.0, 600.0),
    swing=st.floats(0.0, 300.0),
)
def test_subsampling_10_hz_to_4_hz_barely_moves_the_grid_features(
    seed: int, level: float, swing: float
) -> None:
    """The sampling interval must not become the signal (DESIGN.md section 5)."""
    rng = np.random.default_rng(seed)
    t = ten_hz()
    # A smooth, NVML-like signal: 1 s averaged power, utilization updated every ~0.17 s.
    raw = level + swing * rng.random(t.size)
    power = np.convolve(raw, np.ones(10) / 10, mode="same")
    util = np.repeat(rng.choice([0.0, 60.0, 95.0, 100.0], size=t.size // 2 + 1), 2)[: t.size]
    full = grid_result(t, power_w=power, util_gpu_pct=util)
    keep = np.unique(np.floor(t / 0.25 + 1e-9), return_index=True)[1]
    slow = grid_result(t[keep], power_w=power[keep], util_gpu_pct=util[keep])
    for name in ("util_saturated_frac", "power_rel_spread_frac", "power_tdp_frac"):
        assert slow[name] == pytest.approx(full[name], abs=0.2), name


# --- how utilization moves while busy (model v2, known answers) ----------------------------------


def hopping(levels: tuple[float, ...], hold_s: float = 0.5, seconds: float = 10.0) -> np.ndarray:
    """Utilization cycling through ``levels``, each held ``hold_s`` (sampled at 10 Hz).

    Levels change a quarter hold before each multiple of ``hold_s``, so every 0.5 s grid
    instant sees one level clearly (no rounding of sample times at the edge).
    """
    t = ten_hz(seconds)
    index = np.floor((t + hold_s / 4.0) / hold_s).astype(int) % len(levels)
    util: np.ndarray = np.asarray(levels, dtype=np.float64)[index]
    return util


@pytest.mark.parametrize(
    ("levels", "jitter", "mad"),
    [
        ((90.0,), 0.0, 0.0),
        ((86.0, 96.0), 1.0, 5.0),
        ((89.0, 90.0), 0.0, 0.5),
        ((60.0, 100.0), 0.0, 20.0),
        ((90.0, 91.0, 90.0, 96.0), 0.5, 0.5),
    ],
    ids=["steady", "hops-of-10", "rounding-only", "phase-changes", "half-hops"],
)
def test_busy_jitter_and_mad_of_known_hops(
    levels: tuple[float, ...], jitter: float, mad: float
) -> None:
    result = grid_result(ten_hz(), util_gpu_pct=hopping(levels), power_w=500.0)
    assert result["util_busy_jitter_frac"] == pytest.approx(jitter, abs=0.06)
    assert result["util_busy_mad_pct"] == pytest.approx(mad)


def test_jitter_ignores_moves_into_and_out_of_idle() -> None:
    # 2 s busy at 90 %, 2 s idle, alternating: every move is a start or a stop, not jitter.
    util = hopping((90.0, 0.0), hold_s=2.0)
    result = grid_result(ten_hz(), util_gpu_pct=util, power_w=300.0)
    assert result["util_busy_jitter_frac"] == 0.0
    assert result["util_busy_mad_pct"] == 0.0


def test_jitter_and_mad_need_a_busy_window() -> None:
    idle = grid_result(ten_hz(), util_gpu_pct=3.0, power_w=80.0)
    assert "util_busy_jitter_frac" not in idle
    assert "util_busy_mad_pct" not in idle


def test_jitter_survives_a_slower_logger() -> None:
    """Hops held 0.5 s read the same from a 250 ms log (the interval is not the signal)."""
    t = ten_hz()
    util = hopping((86.0, 96.0, 90.0))
    keep = np.unique(np.floor(t / 0.25 + 1e-9), return_index=True)[1]
    full = grid_result(t, util_gpu_pct=util)
    slow = grid_result(t[keep], util_gpu_pct=util[keep])
    # At most one of the 19 grid pairs may hold the previous reading at an edge.
    assert slow["util_busy_jitter_frac"] == pytest.approx(full["util_busy_jitter_frac"], abs=0.06)
    assert full["util_busy_jitter_frac"] > 0.9
    assert slow["util_busy_mad_pct"] == pytest.approx(full["util_busy_mad_pct"])


@pytest.mark.parametrize(
    ("util", "power", "expected"),
    [(100.0, 500.0, 1.0), (100.0, 150.0, 0.0), (90.0, 500.0, 0.0), (98.0, 246.0, 1.0)],
    ids=["pinned-working", "pinned-spinning", "not-pinned", "at-both-limits"],
)
def test_saturated_warm_is_pinned_utilization_at_working_power(
    util: float, power: float, expected: float
) -> None:
    result = grid_result(ten_hz(), util_gpu_pct=util, power_w=power)
    assert result["util_saturated_warm_frac"] == expected
    # Pinned grid instants are either cold or warm, never both.
    if util >= 98.0:
        assert result["util_saturated_warm_frac"] + result["util_busy_cold_frac"] == 1.0


def test_saturated_warm_needs_a_known_sku() -> None:
    result = grid_result(ten_hz(), GPU, util_gpu_pct=100.0, power_w=500.0)
    assert "util_saturated_warm_frac" not in result
