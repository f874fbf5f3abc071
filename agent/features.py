"""Per-GPU window features, kept in a registry so new ones need no pipeline change.

A feature is a function ``(GpuSeries, GpuDescription) -> float | None``; None means the
host did not expose what the feature needs. Feature names carry their unit. Readings
outside physical bounds (a negative power, a utilization of 150 %) are collector glitches
and are treated as missing, so every feature value stays finite and physically ranged.

Design note (DESIGN.md section 5): features describe the *shape* of the signals (duty
cycle, rhythm, slope, lockstep) and never the sampling interval itself.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from agent.samples import GpuDescription
from agent.skus import sku_for
from agent.windows import GpuSeries, Window
from proto.errors import GpuattestError

FeatureFn = Callable[[GpuSeries, GpuDescription], float | None]
FloatArray = npt.NDArray[np.float64]

# No single GPU board draws 10 kW, clocks 100 GHz or holds a PiB: larger readings are glitches.
_MAX_POWER_W = 10_000.0
_VALID_RANGE: dict[str, tuple[float, float]] = {
    "power_w": (0.0, _MAX_POWER_W),
    "power_avg_w": (0.0, _MAX_POWER_W),
    "energy_mj": (0.0, math.inf),
    "util_gpu_pct": (0.0, 100.0),
    "util_mem_pct": (0.0, 100.0),
    "mem_used_mib": (0.0, float(2**30)),
    "sm_clock_mhz": (0.0, 100_000.0),
    "sm_active_pct": (0.0, 100.0),
    "tensor_active_pct": (0.0, 100.0),
    "dram_bw_pct": (0.0, 100.0),
}
# Instantaneous power first; the 1 s averaged reading only when the host lacks it.
_POWER_FIELDS = ("power_w", "power_avg_w")
# Nothing samples faster than 1 kHz: a shorter time spread cannot support a rate or a slope.
_MIN_SPAN_S = 1e-3
_BUSY_UTIL_PCT = 50.0
_IDLE_UTIL_PCT = 5.0
_MIN_PERIOD_S = 0.2
_MIN_PERIODICITY_SAMPLES = 8
# Caps the resampling grid when sample times cluster (keeps the cost bounded).
_MAX_GRID_POINTS = 4096
# Residual power below this fraction of the signal level is rounding noise, not a rhythm.
_FLAT_RELATIVE_RMS = 1e-9
# Fewer common ticks than this make a correlation meaningless.
_MIN_LOCKSTEP_OVERLAP = 5
_LOCKSTEP_FIELDS: dict[str, tuple[str, ...]] = {
    "power_lockstep_corr": _POWER_FIELDS,
    "util_gpu_lockstep_corr": ("util_gpu_pct",),
}
_FEATURE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class FeatureNameError(GpuattestError, ValueError):
    """A feature name that is malformed or already registered."""


_REGISTRY: dict[str, FeatureFn] = {}
FEATURES: Mapping[str, FeatureFn] = MappingProxyType(_REGISTRY)


def register_feature(name: str) -> Callable[[FeatureFn], FeatureFn]:
    """Decorator adding a feature to :data:`FEATURES` under ``name`` (unique, snake_case)."""
    if not _FEATURE_NAME.fullmatch(name):
        raise FeatureNameError(f"feature name must be snake_case, got {name!r}")
    if name in _REGISTRY:
        raise FeatureNameError(f"feature {name!r} is already registered")

    def add(fn: FeatureFn) -> FeatureFn:
        _REGISTRY[name] = fn
        return fn

    return add


def compute_features(
    series: GpuSeries,
    gpu: GpuDescription,
    features: Mapping[str, FeatureFn] = FEATURES,
) -> dict[str, float]:
    """Run every feature; keep only finite values; return them sorted by name."""
    result: dict[str, float] = {}
    for name in sorted(features):
        value = features[name](series, gpu)
        if value is not None and math.isfinite(value):
            result[name] = float(value)
    return result


def window_features(window: Window, gpus: Iterable[GpuDescription]) -> dict[int, dict[str, float]]:
    """Per-GPU and cross-GPU features of one window, for every described or sampled GPU."""
    described = {gpu.index: gpu for gpu in gpus}
    for index in window.gpu_indices():
        described.setdefault(index, GpuDescription(index=index))
    host = host_features(window, described.values())
    return {
        index: dict(sorted({**compute_features(window.series(index), gpu), **host[index]}.items()))
        for index, gpu in sorted(described.items())
    }


# --- helpers shared by the features -------------------------------------------------------


def _valid(series: GpuSeries, name: str) -> tuple[FloatArray, FloatArray]:
    """Times and values of the samples holding a physically plausible reading of ``name``."""
    values = series.values.get(name)
    if values is None:
        return np.empty(0), np.empty(0)
    low, high = _VALID_RANGE.get(name, (-math.inf, math.inf))
    # NaN compares false, so missing readings drop out here too.
    keep = (values >= low) & (values <= high)
    return series.t[keep], values[keep]


def _power(series: GpuSeries) -> tuple[FloatArray, FloatArray]:
    for name in _POWER_FIELDS:
        t, v = _valid(series, name)
        if v.size:
            return t, v
    return np.empty(0), np.empty(0)


def _quantile(values: FloatArray, q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), q in [0, 1], values non-empty.

    Sorting directly is several times cheaper than np.percentile / np.median on the
    ~100-sample arrays of a window, and this runs for every GPU every window.
    """
    ordered = np.sort(values)
    position = q * (ordered.size - 1)
    below = math.floor(position)
    above = min(below + 1, ordered.size - 1)
    low, high = float(ordered[below]), float(ordered[above])
    return low + (high - low) * (position - below)


def _median_interval_s(t: FloatArray) -> float | None:
    steps = np.diff(t)
    steps = steps[steps > 0]
    return _quantile(steps, 0.5) if steps.size else None


def _covered_s(series: GpuSeries) -> float | None:
    """Seconds of the window the samples stand for: distinct sample times x median interval."""
    interval = _median_interval_s(series.t)
    if interval is None or series.duration_s <= 0:
        return None
    distinct = 1 + int(np.count_nonzero(np.diff(series.t) > 0))
    return min(series.duration_s, distinct * interval)


def _mean(series: GpuSeries, name: str) -> float | None:
    _, v = _valid(series, name)
    return float(v.mean()) if v.size else None


def _percentile(series: GpuSeries, name: str, q_pct: float) -> float | None:
    _, v = _valid(series, name)
    return _quantile(v, q_pct / 100.0) if v.size else None


def _fraction(
    series: GpuSeries, name: str, test: Callable[[FloatArray], npt.NDArray[np.bool_]]
) -> float | None:
    _, v = _valid(series, name)
    return float(np.count_nonzero(test(v))) / v.size if v.size else None


# --- the initial feature set ----------------------------------------------------------------


@register_feature("sample_count")
def _sample_count(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return float(series.sample_count)


@register_feature("coverage_frac")
def _coverage_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    covered = _covered_s(series)
    return None if covered is None else covered / series.duration_s


@register_feature("util_gpu_mean_pct")
def _util_gpu_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "util_gpu_pct")


@register_feature("util_gpu_std_pct")
def _util_gpu_std_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    _, v = _valid(series, "util_gpu_pct")
    return float(v.std()) if v.size else None


@register_feature("util_gpu_p10_pct")
def _util_gpu_p10_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _percentile(series, "util_gpu_pct", 10.0)


@register_feature("util_gpu_p90_pct")
def _util_gpu_p90_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _percentile(series, "util_gpu_pct", 90.0)


@register_feature("busy_frac")
def _busy_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _fraction(series, "util_gpu_pct", lambda v: v >= _BUSY_UTIL_PCT)


@register_feature("idle_frac")
def _idle_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _fraction(series, "util_gpu_pct", lambda v: v <= _IDLE_UTIL_PCT)


@register_feature("util_mem_mean_pct")
def _util_mem_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "util_mem_pct")


@register_feature("power_mean_w")
def _power_mean_w(series: GpuSeries, gpu: GpuDescription) -> float | None:
    _, v = _power(series)
    return float(v.mean()) if v.size else None


@register_feature("power_std_w")
def _power_std_w(series: GpuSeries, gpu: GpuDescription) -> float | None:
    _, v = _power(series)
    return float(v.std()) if v.size else None


@register_feature("power_p90_w")
def _power_p90_w(series: GpuSeries, gpu: GpuDescription) -> float | None:
    _, v = _power(series)
    return _quantile(v, 0.9) if v.size else None


@register_feature("power_max_w")
def _power_max_w(series: GpuSeries, gpu: GpuDescription) -> float | None:
    _, v = _power(series)
    return float(v.max()) if v.size else None


@register_feature("power_frac_of_limit")
def _power_frac_of_limit(series: GpuSeries, gpu: GpuDescription) -> float | None:
    limit = gpu.power_limit_w
    if not (math.isfinite(limit) and limit > 0):
        return None
    _, v = _power(series)
    return float(v.mean()) / limit if v.size else None


@register_feature("energy_j")
def _energy_j(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Energy over the time the samples cover (see _covered_s).

    Average power over the observed span times the covered time, rather than the integral
    from the first to the last sample: that way consecutive windows of a regular stream add
    up to the stream's total instead of each losing the interval across its boundary.
    """
    covered = _covered_s(series)
    if covered is None:
        return None
    average_w = _counter_power_w(series)
    if average_w is None:
        average_w = _integrated_power_w(series)
    return None if average_w is None else average_w * covered


def _counter_power_w(series: GpuSeries) -> float | None:
    """Average power from the monotonic energy counter; None if absent or it was reset."""
    t, energy_mj = _valid(series, "energy_mj")
    if t.size < 2 or t[-1] - t[0] < _MIN_SPAN_S or np.any(np.diff(energy_mj) < 0):
        return None
    average_w = float(energy_mj[-1] - energy_mj[0]) / 1000.0 / float(t[-1] - t[0])
    return average_w if average_w <= _MAX_POWER_W else None


def _integrated_power_w(series: GpuSeries) -> float | None:
    """Time-weighted average power (trapezoidal rule) over the span of the power samples."""
    t, power_w = _power(series)
    if t.size < 2 or t[-1] - t[0] < _MIN_SPAN_S:
        return None
    area = float(np.sum(np.diff(t) * (power_w[1:] + power_w[:-1]) / 2.0))
    return area / float(t[-1] - t[0])


@register_feature("mem_used_mean_mib")
def _mem_used_mean_mib(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "mem_used_mib")


@register_feature("mem_used_slope_mib_per_s")
def _mem_used_slope_mib_per_s(series: GpuSeries, gpu: GpuDescription) -> float | None:
    t, v = _valid(series, "mem_used_mib")
    if t.size < 2 or t[-1] - t[0] < _MIN_SPAN_S:
        return None
    centred = t - t.mean()
    return float(centred @ (v - v.mean()) / (centred @ centred))


@register_feature("sm_clock_mean_mhz")
def _sm_clock_mean_mhz(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "sm_clock_mhz")


@register_feature("sm_active_mean_pct")
def _sm_active_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "sm_active_pct")


@register_feature("tensor_active_mean_pct")
def _tensor_active_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "tensor_active_pct")


@register_feature("dram_bw_mean_pct")
def _dram_bw_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    return _mean(series, "dram_bw_pct")


@register_feature("power_dominant_period_s")
def _power_dominant_period_s(series: GpuSeries, gpu: GpuDescription) -> float | None:
    peak = _power_autocorrelation_peak(series)
    return None if peak is None else peak[0]


@register_feature("power_periodicity")
def _power_periodicity(series: GpuSeries, gpu: GpuDescription) -> float | None:
    peak = _power_autocorrelation_peak(series)
    return None if peak is None else peak[1]


# --- power rhythm -----------------------------------------------------------------------------


# Period and height come from one computation; GpuSeries hashes by identity, and a few
# entries cover the features of one series being computed in turn.
@functools.lru_cache(maxsize=4)
def _power_autocorrelation_peak(series: GpuSeries) -> tuple[float | None, float] | None:
    """(period s, height 0..1) of the strongest autocorrelation peak of the power signal.

    The power is resampled to a uniform grid at the median sample interval, detrended
    (least-squares line), and its normalised autocorrelation searched for local maxima
    between 0.2 s and half the window. A signal without a positive peak (flat, or no
    rhythm) has height 0 and no period. None when there are too few samples to tell.
    """
    grid = _uniform_power(series)
    if grid is None:
        return None
    step_s, power_w = grid
    lag_min = max(1, math.ceil(_MIN_PERIOD_S / step_s - 1e-9))
    lag_max = min(math.floor(series.duration_s / 2.0 / step_s + 1e-9), power_w.size - 2)
    if lag_max < lag_min:
        return None
    residual = _detrended(power_w)
    level = max(1.0, float(np.abs(power_w).mean()))
    if float(np.sqrt(np.mean(residual * residual))) <= _FLAT_RELATIVE_RMS * level:
        return None, 0.0
    acf = _autocorrelation(residual)
    return _strongest_peak(acf, lag_min, lag_max, step_s, series.duration_s / 2.0)


def _uniform_power(series: GpuSeries) -> tuple[float, FloatArray] | None:
    """Power linearly interpolated onto a uniform grid: (grid step s, values)."""
    t, power_w = _power(series)
    t, first = np.unique(t, return_index=True)
    power_w = power_w[first]
    if t.size < _MIN_PERIODICITY_SAMPLES:
        return None
    step_s = _quantile(np.diff(t), 0.5)
    span_s = float(t[-1] - t[0])
    points = math.floor(span_s / step_s + 1e-9) + 1
    if points > _MAX_GRID_POINTS:
        points = _MAX_GRID_POINTS
        step_s = span_s / (points - 1)
    if points < _MIN_PERIODICITY_SAMPLES:
        return None
    grid = t[0] + step_s * np.arange(points, dtype=np.float64)
    return step_s, np.interp(grid, t, power_w)


def _detrended(values: FloatArray) -> FloatArray:
    """Residual of a least-squares line through equally spaced values."""
    x = np.arange(values.size, dtype=np.float64)
    x -= x.mean()
    centred = values - values.mean()
    slope = float(x @ centred) / float(x @ x)
    residual: FloatArray = centred - slope * x
    return residual


def _autocorrelation(values: FloatArray) -> FloatArray:
    """Biased, normalised autocorrelation (lag 0 = 1) via FFT; |r| <= 1 by construction."""
    size = values.size
    padded = 1 << (2 * size - 1).bit_length()
    spectrum = np.fft.rfft(values, padded)
    acf = np.fft.irfft(spectrum * np.conj(spectrum), padded)[:size]
    normalised: FloatArray = np.clip(acf / acf[0], -1.0, 1.0)
    return normalised


def _strongest_peak(
    acf: FloatArray, lag_min: int, lag_max: int, step_s: float, max_period_s: float
) -> tuple[float | None, float]:
    """Highest local maximum of ``acf`` in [lag_min, lag_max], refined by a parabola."""
    lags = np.arange(lag_min, lag_max + 1)
    here, before, after = acf[lags], acf[lags - 1], acf[lags + 1]
    is_peak = (here > before) & (here >= after) & (here > 0.0)
    if not np.any(is_peak):
        return None, 0.0
    best = int(lags[is_peak][np.argmax(here[is_peak])])
    curvature = acf[best - 1] - 2.0 * acf[best] + acf[best + 1]
    # Vertex of the parabola through the three points; within half a lag of the sample.
    shift = 0.5 * (acf[best - 1] - acf[best + 1]) / curvature if curvature < 0 else 0.0
    period_s = (best + float(np.clip(shift, -0.5, 0.5))) * step_s
    period_s = min(max(period_s, _MIN_PERIOD_S), max_period_s)
    return period_s, float(min(acf[best], 1.0))


# --- cross-GPU features -----------------------------------------------------------------------


def host_features(window: Window, gpus: Iterable[GpuDescription]) -> dict[int, dict[str, float]]:
    """Features comparing each described GPU with the other GPUs of the host in one window.

    ``power_lockstep_corr`` and ``util_gpu_lockstep_corr``: the mean Pearson correlation of
    a GPU's power (utilization) with each other GPU's, over the ticks where both have a
    reading. Data-parallel training moves all GPUs of a node in step; independent serving
    replicas do not. A pair needs at least a few common ticks and variation on both sides;
    a GPU with no such pair has no value. Every described GPU gets an entry (maybe empty);
    samples of undescribed GPUs are ignored.
    """
    indices = sorted({gpu.index for gpu in gpus})
    result: dict[int, dict[str, float]] = {index: {} for index in indices}
    if len(indices) < 2:
        return result
    column_of = {index: column for column, index in enumerate(indices)}
    for feature_name, field_names in _LOCKSTEP_FIELDS.items():
        readings = _tick_matrix(window, column_of, field_names)
        if readings is None:
            continue
        mean_corr = _mean_pairwise_correlation(readings)
        for index, column in column_of.items():
            if math.isfinite(mean_corr[column]):
                result[index][feature_name] = float(mean_corr[column])
    return result


def _tick_matrix(
    window: Window, column_of: Mapping[int, int], field_names: tuple[str, ...]
) -> FloatArray | None:
    """Readings as a (tick, GPU) matrix, NaN where missing, for the first field any GPU has."""
    for name in field_names:
        matrix = np.full((len(window.ticks), len(column_of)), math.nan)
        for row, tick in enumerate(window.ticks):
            for sample in tick.samples:
                column = column_of.get(sample.gpu_index)
                value = sample.values.get(name)
                if column is not None and value is not None:
                    matrix[row, column] = value
        low, high = _VALID_RANGE.get(name, (-math.inf, math.inf))
        matrix[~((matrix >= low) & (matrix <= high))] = math.nan
        if np.any(np.isfinite(matrix)):
            return matrix
    return None


def _mean_pairwise_correlation(readings: FloatArray) -> FloatArray:
    """For each column, the mean correlation with every other column (pairwise-complete).

    Sums over the rows where both columns of a pair are present come from matrix products
    of the zero-filled data with the presence mask, so all pairs cost a few BLAS calls.
    """
    present = np.isfinite(readings)
    weight = present.astype(np.float64)
    counts = present.sum(axis=0)
    column_means = np.where(present, readings, 0.0).sum(axis=0) / np.maximum(counts, 1)
    # Centring first keeps the sums of squares free of cancellation.
    x = np.where(present, readings - column_means, 0.0)
    pairs_n = weight.T @ weight
    sum_x = x.T @ weight  # [i, j]: sum of column i over rows where i and j are present
    sum_xx = (x * x).T @ weight
    sum_xy = x.T @ x
    with np.errstate(divide="ignore", invalid="ignore"):
        var_i = sum_xx - sum_x * sum_x / pairs_n
        cov = sum_xy - sum_x * sum_x.T / pairs_n
        corr = cov / np.sqrt(var_i * var_i.T)
    varies = (var_i > 1e-9 * sum_xx) & (var_i > 0)
    usable = (pairs_n >= _MIN_LOCKSTEP_OVERLAP) & varies & varies.T
    np.fill_diagonal(usable, False)
    usable &= np.isfinite(corr)
    pair_count = usable.sum(axis=1)
    total = np.where(usable, np.clip(corr, -1.0, 1.0), 0.0).sum(axis=1)
    mean: FloatArray = np.where(pair_count > 0, total / np.maximum(pair_count, 1), math.nan)
    return mean


# --- features on a common time grid -----------------------------------------------------------
#
# Loggers sample at 100 ms, 250 ms or 1 s, and some drivers report power as a 1 s average
# while others report it instantaneously. Neither may become the signal (DESIGN.md section 5),
# so the features below read every GPU on one grid: a point every GRID_STEP_S seconds of the
# window, holding the last utilization reading (zero-order hold, as a slower logger would
# have seen it) and the mean power over the trailing second (what the averaging drivers
# report anyway). Subsampling a 100 ms log to 250 ms leaves these features nearly unchanged.

GRID_STEP_S = 0.5
_POWER_SMOOTHING_S = 1.0
# A reading older than this no longer stands for the grid instant (a logger stall).
_MAX_HOLD_S = 1.0
# Fewer grid points than this (2 s of a window) carry no shape worth describing.
_MIN_GRID_POINTS = 4
# nvidia-smi prints whole percent: a queue that never drains reads 99-100 %.
_SATURATED_UTIL_PCT = 98.0
_RHYTHM_MIN_PERIOD_S = 1.0
_RHYTHM_MAX_PERIOD_S = 5.0


@dataclass(frozen=True)
class _Grid:
    """Readings at the grid instants; NaN where the window holds no reading for an instant."""

    util_pct: FloatArray
    power_w: FloatArray


def _grid_times(duration_s: float) -> FloatArray:
    """Grid instants step, 2 step, ... up to the window's end (20 points in a 10 s window)."""
    count = math.floor(duration_s / GRID_STEP_S + 1e-9)
    return GRID_STEP_S * np.arange(1, count + 1, dtype=np.float64)


def _held(t: FloatArray, v: FloatArray, grid: FloatArray) -> FloatArray:
    """The last reading at or before each grid instant, if not older than _MAX_HOLD_S."""
    latest = np.searchsorted(t, grid, side="right") - 1
    held = np.full(grid.size, math.nan)
    found = latest >= 0
    fresh = found.copy()
    fresh[found] = grid[found] - t[latest[found]] <= _MAX_HOLD_S
    held[fresh] = v[latest[fresh]]
    return held


def _trailing_mean(t: FloatArray, v: FloatArray, grid: FloatArray) -> FloatArray:
    """Mean of the readings in (g - _POWER_SMOOTHING_S, g] for each grid instant g."""
    sums = np.concatenate(([0.0], np.cumsum(v)))
    first = np.searchsorted(t, grid - _POWER_SMOOTHING_S, side="right")
    last = np.searchsorted(t, grid, side="right")
    count = last - first
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: FloatArray = np.where(count > 0, (sums[last] - sums[first]) / count, math.nan)
    return mean


@functools.lru_cache(maxsize=4)
def _common_grid(series: GpuSeries) -> _Grid:
    grid = _grid_times(series.duration_s)
    util_t, util = _valid(series, "util_gpu_pct")
    power_t, power = _power(series)
    return _Grid(util_pct=_held(util_t, util, grid), power_w=_trailing_mean(power_t, power, grid))


def _grid_values(values: FloatArray) -> FloatArray | None:
    present = values[np.isfinite(values)]
    return present if present.size >= _MIN_GRID_POINTS else None


@register_feature("util_saturated_frac")
def _util_saturated_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Share of the window the kernel queue never drained (utilization pinned at ~100 %)."""
    util = _grid_values(_common_grid(series).util_pct)
    return (
        None if util is None else float(np.count_nonzero(util >= _SATURATED_UTIL_PCT)) / util.size
    )


@register_feature("util_active_mean_pct")
def _util_active_mean_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Mean utilization over the grid instants when the GPU was not idle."""
    util = _grid_values(_common_grid(series).util_pct)
    if util is None:
        return None
    active = util[util > _IDLE_UTIL_PCT]
    return float(active.mean()) if active.size else None


@register_feature("power_rel_spread_frac")
def _power_rel_spread_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """(p95 - p5) / p95 of the smoothed power: how far the draw swings within the window."""
    power = _grid_values(_common_grid(series).power_w)
    if power is None:
        return None
    high = _quantile(power, 0.95)
    return None if high <= 0 else (high - _quantile(power, 0.05)) / high


@register_feature("power_rel_rough_frac")
def _power_rel_rough_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Mean change of the smoothed power between adjacent grid instants, over its mean."""
    power = _common_grid(series).power_w
    steps = np.abs(np.diff(power))
    steps = steps[np.isfinite(steps)]
    present = power[np.isfinite(power)]
    if steps.size < _MIN_GRID_POINTS - 1 or present.size == 0 or present.mean() <= 0:
        return None
    return min(1.0, float(steps.mean() / present.mean()))


@register_feature("power_rel_peak_frac")
def _power_rel_peak_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """(max - median) / max of the smoothed power: how much short peaks stand out."""
    power = _grid_values(_common_grid(series).power_w)
    if power is None:
        return None
    peak = float(power.max())
    return None if peak <= 0 else (peak - _quantile(power, 0.5)) / peak


@register_feature("power_tdp_frac")
def _power_tdp_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Median smoothed power over the SKU's TDP (capped at 1); None for an unknown SKU."""
    sku = sku_for(gpu.name, gpu.memory_total_mib)
    power = _grid_values(_common_grid(series).power_w)
    if sku is None or power is None:
        return None
    return min(1.0, _quantile(power, 0.5) / sku.tdp_w)


@register_feature("power_rhythm_periodicity")
def _power_rhythm_periodicity(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Height (0..1) of the strongest autocorrelation peak of the smoothed power, 1-5 s lags."""
    power = _common_grid(series).power_w
    if np.count_nonzero(np.isfinite(power)) < _MIN_PERIODICITY_SAMPLES:
        return None
    present = np.isfinite(power)
    # Interior gaps are bridged linearly; a stall longer than the window leaves few points.
    filled = np.interp(np.arange(power.size), np.flatnonzero(present), power[present])
    residual = _detrended(filled)
    level = max(1.0, float(np.abs(filled).mean()))
    if float(np.sqrt(np.mean(residual * residual))) <= _FLAT_RELATIVE_RMS * level:
        return 0.0
    lag_min = round(_RHYTHM_MIN_PERIOD_S / GRID_STEP_S)
    lag_max = min(round(_RHYTHM_MAX_PERIOD_S / GRID_STEP_S), filled.size // 2)
    if lag_max <= lag_min:
        return None
    acf = _autocorrelation(residual)
    _, height = _strongest_peak(acf, lag_min, lag_max, GRID_STEP_S, _RHYTHM_MAX_PERIOD_S)
    return height


# Spin-waiting: a kernel resident all the time while the board draws little more than idle.
_BUSY_COLD_UTIL_PCT = 90.0
_BUSY_COLD_TDP_FRAC = 0.35


@register_feature("util_busy_cold_frac")
def _util_busy_cold_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Share of the window with utilization >= 90 % but power <= 35 % of the SKU's TDP.

    A GPU reads busy whenever any kernel is resident, even one that only polls a flag: a
    collective waiting for a slower peer (gradient sync, a checkpoint barrier) looks like
    this. None for an unknown SKU.
    """
    return _share_of_grid(
        series,
        gpu,
        lambda util, power, tdp: (
            (util >= _BUSY_COLD_UTIL_PCT) & (power <= _BUSY_COLD_TDP_FRAC * tdp)
        ),
    )


def _share_of_grid(
    series: GpuSeries,
    gpu: GpuDescription,
    inside: Callable[[FloatArray, FloatArray, float], npt.NDArray[np.bool_]],
) -> float | None:
    """Share of the grid points with both utilization and power read where
    ``inside(util_pct, power_w, tdp_w)`` holds; None for an unknown SKU or too few points."""
    sku = sku_for(gpu.name, gpu.memory_total_mib)
    grid = _common_grid(series)
    both = np.isfinite(grid.util_pct) & np.isfinite(grid.power_w)
    if sku is None or np.count_nonzero(both) < _MIN_GRID_POINTS:
        return None
    chosen = inside(grid.util_pct[both], grid.power_w[both], sku.tdp_w)
    return float(np.count_nonzero(chosen)) / float(np.count_nonzero(both))


# --- how utilization moves while the GPU works (issue 3, model v2) -------------------------------
#
# The utilization counter reports the share of its own sample period (1/6 s to 1 s, by product)
# in which some kernel ran. A training step of a fraction of a second has its host-side gaps
# (optimizer step, data loading, launch overhead) at fixed points of the step, so each counter
# period catches a different slice of it: the reading hops by a few points from one instant to
# the next (86, 96, 89, ...) although the GPU never stops working. A serving engine runs decode
# steps of a few tens of milliseconds, many per counter period, so the same gaps average out
# and the reading stays within a point or two (89, 90, 91). The hops are the iteration rhythm
# aliased into the counter: visible even where the driver averages power over a second.

# Whole-percent readings differ by 1 through rounding alone.
_JITTER_MIN_STEP_PCT = 2.0
# A larger move is a change of phase (a request burst ends, a sync begins), not jitter.
_JITTER_MAX_STEP_PCT = 15.0
# Utilization pinned while the board draws more than a spin-wait does.
_SATURATED_WARM_TDP_FRAC = _BUSY_COLD_TDP_FRAC


def _busy_grid_util(series: GpuSeries) -> FloatArray:
    """Grid utilization with the instants where the GPU was not busy (< 50 %) set to NaN."""
    util = _common_grid(series).util_pct
    busy: FloatArray = np.where(util >= _BUSY_UTIL_PCT, util, math.nan)
    return busy


@register_feature("util_busy_jitter_frac")
def _util_busy_jitter_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Share of adjacent busy grid instants between which utilization hops by 2-15 points.

    Pairs where either instant is not busy (or holds no reading) do not count; None with
    fewer than three busy pairs.
    """
    steps = np.abs(np.diff(_busy_grid_util(series)))
    steps = steps[np.isfinite(steps)]
    if steps.size < _MIN_GRID_POINTS - 1:
        return None
    hops = (steps >= _JITTER_MIN_STEP_PCT) & (steps <= _JITTER_MAX_STEP_PCT)
    return float(np.count_nonzero(hops)) / steps.size


@register_feature("util_busy_mad_pct")
def _util_busy_mad_pct(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Median absolute deviation of utilization over the busy grid instants (robust spread)."""
    util = _grid_values(_busy_grid_util(series))
    if util is None:
        return None
    centre = _quantile(util, 0.5)
    return _quantile(np.abs(util - centre), 0.5)


@register_feature("util_saturated_warm_frac")
def _util_saturated_warm_frac(series: GpuSeries, gpu: GpuDescription) -> float | None:
    """Share of the window with utilization >= 98 % and power above 35 % of the SKU's TDP.

    The counterpart of ``util_busy_cold_frac``: a queue that never drains while the board
    does real work. Training pins utilization mostly while ranks wait in a collective (cold);
    a serving engine with asynchronous scheduling keeps a kernel queued all the time at
    working power. None for an unknown SKU.
    """
    return _share_of_grid(
        series,
        gpu,
        lambda util, power, tdp: (
            (util >= _SATURATED_UTIL_PCT) & (power > _SATURATED_WARM_TDP_FRAC * tdp)
        ),
    )
