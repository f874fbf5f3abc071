"""Tests for agent.windows: alignment, tiling, gaps, late ticks, series and raw-sample bytes."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.samples import GpuSample, Tick
from agent.windows import (
    GpuSeries,
    Window,
    WindowAssembler,
    WindowSizeError,
    raw_samples_bytes,
)
from proto.errors import GpuattestError


def tick(t: float, *gpus: int, **values: float) -> Tick:
    """A tick at ``t`` with the same readings on each listed GPU (GPU 0 if none listed)."""
    return Tick(t, tuple(GpuSample(g, dict(values)) for g in (gpus or (0,))))


def feed(assembler: WindowAssembler, times: list[float]) -> list[Window]:
    windows: list[Window] = []
    for t in times:
        windows += assembler.add(tick(t, power_w=100.0))
    last = assembler.flush()
    return windows + ([last] if last is not None else [])


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window_s",
    [0.0, -1.0, 10.000001, 60.0, math.nan, math.inf, -math.inf],
    ids=["zero", "negative", "just-over-10", "minute", "nan", "inf", "minus-inf"],
)
def test_invalid_window_length_is_refused(window_s: float) -> None:
    with pytest.raises(WindowSizeError):
        WindowAssembler(window_s)


def test_window_size_error_is_in_the_project_tree_and_a_value_error() -> None:
    assert issubclass(WindowSizeError, GpuattestError)
    assert issubclass(WindowSizeError, ValueError)


@pytest.mark.parametrize("window_s", [10.0, 0.001, 2.5], ids=["max", "tiny", "fraction"])
def test_valid_window_lengths_are_accepted(window_s: float) -> None:
    assert WindowAssembler(window_s).window_s == window_s


# --- alignment and tiling -------------------------------------------------------------------


def test_windows_are_aligned_to_multiples_and_tile_time() -> None:
    times = [1000.05 + 0.1 * i for i in range(250)]  # 1000.05 .. 1024.95 at 10 Hz
    windows = feed(WindowAssembler(10.0), times)

    assert [(w.start_unix_s, w.end_unix_s) for w in windows] == [
        (1000.0, 1010.0),
        (1010.0, 1020.0),
        (1020.0, 1030.0),
    ]
    assert sum(len(w.ticks) for w in windows) == len(times)
    for w in windows:
        assert all(w.start_unix_s <= tk.t_unix_s < w.end_unix_s for tk in w.ticks)


def test_tick_on_a_boundary_opens_the_next_window() -> None:
    assembler = WindowAssembler(5.0)
    assert assembler.add(tick(4.999)) == []
    completed = assembler.add(tick(5.0))

    assert [(w.start_unix_s, w.end_unix_s) for w in completed] == [(0.0, 5.0)]
    last = assembler.flush()
    assert last is not None
    assert (last.start_unix_s, [tk.t_unix_s for tk in last.ticks]) == (5.0, [5.0])


def test_a_window_is_returned_by_the_tick_that_completes_it() -> None:
    assembler = WindowAssembler(1.0)
    assert assembler.add(tick(0.1)) == []
    assert assembler.add(tick(0.9)) == []
    completed = assembler.add(tick(1.2))
    assert len(completed) == 1
    assert [tk.t_unix_s for tk in completed[0].ticks] == [0.1, 0.9]


def test_a_stall_longer_than_a_window_yields_no_empty_windows() -> None:
    windows = feed(WindowAssembler(10.0), [0.0, 1.0, 2.0, 35.0, 36.0])

    assert [(w.start_unix_s, w.end_unix_s) for w in windows] == [(0.0, 10.0), (30.0, 40.0)]
    assert all(w.ticks for w in windows)


@settings(max_examples=150, deadline=None)
@given(
    window_s=st.sampled_from([0.1, 0.25, 1.0, 2.5, 3.0, 7.0, 10.0]),
    start=st.floats(min_value=0.0, max_value=2e9),
    steps=st.lists(st.floats(min_value=0.0, max_value=25.0), max_size=60),
)
def test_windows_never_overlap_and_keep_every_tick_once(
    window_s: float, start: float, steps: list[float]
) -> None:
    times = [float(t) for t in np.cumsum([start, *steps])]
    windows = feed(WindowAssembler(window_s), times)

    assert [tk.t_unix_s for w in windows for tk in w.ticks] == times
    for w in windows:
        assert w.start_unix_s == round(w.start_unix_s / window_s) * window_s
        assert w.end_unix_s > w.start_unix_s
        assert all(w.start_unix_s <= tk.t_unix_s < w.end_unix_s for tk in w.ticks)
    for earlier, later in itertools.pairwise(windows):
        assert earlier.end_unix_s <= later.start_unix_s


# --- late and invalid ticks -----------------------------------------------------------------


def test_a_tick_earlier_than_the_last_one_is_dropped_and_counted() -> None:
    assembler = WindowAssembler(10.0)
    assembler.add(tick(5.0))
    assert assembler.add(tick(4.0)) == []
    assembler.add(tick(5.0))  # equal time is in order
    window = assembler.flush()

    assert assembler.dropped_ticks == 1
    assert window is not None
    assert [tk.t_unix_s for tk in window.ticks] == [5.0, 5.0]


def test_a_late_tick_for_an_already_emitted_window_is_dropped() -> None:
    assembler = WindowAssembler(1.0)
    assembler.add(tick(0.5))
    assembler.add(tick(1.5))
    assert assembler.add(tick(0.7)) == []
    assert assembler.dropped_ticks == 1


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "minus-inf"])
def test_a_tick_without_a_finite_time_is_dropped(t: float) -> None:
    assembler = WindowAssembler(1.0)
    assembler.add(tick(0.5))
    assert assembler.add(tick(t)) == []
    assert assembler.dropped_ticks == 1
    window = assembler.flush()
    assert window is not None
    assert len(window.ticks) == 1


# --- flush ----------------------------------------------------------------------------------


def test_flush_with_nothing_open_returns_none() -> None:
    assembler = WindowAssembler(1.0)
    assert assembler.flush() is None
    assembler.add(tick(0.5))
    assert assembler.flush() is not None
    assert assembler.flush() is None


def test_flush_returns_the_partial_window_and_assembly_continues() -> None:
    assembler = WindowAssembler(10.0)
    assembler.add(tick(3.0))
    partial = assembler.flush()
    assembler.add(tick(12.0))
    after = assembler.flush()

    assert partial is not None
    assert after is not None
    assert (partial.start_unix_s, partial.end_unix_s, len(partial.ticks)) == (0.0, 10.0, 1)
    assert (after.start_unix_s, len(after.ticks)) == (10.0, 1)


def test_ticks_into_a_flushed_window_are_dropped_so_windows_never_overlap() -> None:
    assembler = WindowAssembler(10.0)
    assembler.add(tick(3.0))
    assembler.flush()
    assert assembler.add(tick(4.0)) == []
    assert assembler.flush() is None
    assert assembler.dropped_ticks == 1


# --- Window and GpuSeries -------------------------------------------------------------------


def test_gpu_indices_are_sorted_and_unique() -> None:
    window = Window(0.0, 1.0, (tick(0.1, 3, 1), tick(0.2, 1, 0)))
    assert window.gpu_indices() == (0, 1, 3)


def test_series_has_nan_where_a_field_was_missing_and_only_seen_fields() -> None:
    window = Window(
        100.0,
        110.0,
        (
            Tick(100.5, (GpuSample(0, {"power_w": 50.0}), GpuSample(1, {"util_gpu_pct": 9.0}))),
            Tick(101.5, (GpuSample(0, {"power_w": 60.0, "util_gpu_pct": 30.0}),)),
        ),
    )
    series = window.series(0)

    assert isinstance(series, GpuSeries)
    assert series.t.dtype == np.float64
    np.testing.assert_array_equal(series.t, [0.5, 1.5])
    assert sorted(series.values) == ["power_w", "util_gpu_pct"]
    np.testing.assert_array_equal(series.values["power_w"], [50.0, 60.0])
    np.testing.assert_array_equal(series.values["util_gpu_pct"], [np.nan, 30.0])
    assert (series.start_unix_s, series.duration_s, series.sample_count) == (100.0, 10.0, 2)


def test_series_turns_non_finite_readings_into_nan() -> None:
    window = Window(0.0, 1.0, (tick(0.1, power_w=math.inf), tick(0.2, power_w=5.0)))
    np.testing.assert_array_equal(window.series(0).values["power_w"], [np.nan, 5.0])


def test_series_of_an_absent_gpu_is_empty() -> None:
    series = Window(0.0, 1.0, (tick(0.1, 0, power_w=1.0),)).series(7)
    assert series.sample_count == 0
    assert series.values == {}


def test_series_is_sorted_by_time_even_for_a_hand_built_window() -> None:
    window = Window(0.0, 1.0, (tick(0.6, power_w=2.0), tick(0.2, power_w=1.0)))
    series = window.series(0)
    np.testing.assert_array_equal(series.t, [0.2, 0.6])
    np.testing.assert_array_equal(series.values["power_w"], [1.0, 2.0])


def test_series_arrays_are_read_only() -> None:
    series = Window(0.0, 1.0, (tick(0.1, power_w=1.0),)).series(0)
    with pytest.raises(ValueError, match="read-only"):
        series.values["power_w"][0] = 2.0
    with pytest.raises(ValueError, match="read-only"):
        series.t[0] = 2.0


# --- raw_samples_bytes ----------------------------------------------------------------------


def small_window() -> Window:
    return Window(
        1700000000.0,
        1700000010.0,
        (
            Tick(
                1700000000.1,
                (
                    GpuSample(1, {"util_gpu_pct": 97.0, "power_w": 301.25}),
                    GpuSample(0, {"power_w": 0.1}),
                ),
            ),
            Tick(1700000000.2, (GpuSample(0, {"power_w": 1e-07, "util_gpu_pct": 0.0}),)),
        ),
    )


def test_raw_samples_bytes_has_the_documented_format() -> None:
    assert raw_samples_bytes(small_window()) == (
        b"t_s,gpu,power_w,util_gpu_pct\n"
        b"1700000000.1,0,0.1,\n"
        b"1700000000.1,1,301.25,97.0\n"
        b"1700000000.2,0,1e-07,0.0\n"
    )


def test_raw_samples_bytes_of_an_empty_window_is_just_the_header() -> None:
    assert raw_samples_bytes(Window(0.0, 1.0, ())) == b"t_s,gpu\n"


def test_raw_samples_bytes_is_deterministic_and_ignores_sample_order_in_a_tick() -> None:
    window = small_window()
    reordered = Window(
        window.start_unix_s,
        window.end_unix_s,
        (Tick(window.ticks[0].t_unix_s, window.ticks[0].samples[::-1]), window.ticks[1]),
    )
    assert raw_samples_bytes(window) == raw_samples_bytes(small_window())
    assert raw_samples_bytes(window) == raw_samples_bytes(reordered)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=7),
            st.dictionaries(
                st.sampled_from(["power_w", "util_gpu_pct", "energy_mj"]),
                st.floats(allow_nan=False, allow_infinity=False),
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    times=st.lists(st.floats(min_value=0.0, max_value=2e9), min_size=8, max_size=8),
)
def test_raw_samples_bytes_round_trips_every_value_exactly(
    rows: list[tuple[int, dict[str, float]]], times: list[float]
) -> None:
    ticks = tuple(
        Tick(t, (GpuSample(gpu, values),)) for t, (gpu, values) in zip(times, rows, strict=False)
    )
    parsed = list(csv.DictReader(io.StringIO(raw_samples_bytes(Window(0.0, 1.0, ticks)).decode())))

    assert len(parsed) == len(ticks)
    for row, tk in zip(parsed, ticks, strict=True):
        sample = tk.samples[0]
        assert float(row.pop("t_s")) == tk.t_unix_s
        assert int(row.pop("gpu")) == sample.gpu_index
        assert {k: float(v) for k, v in row.items() if v != ""} == sample.values


def with_first_tick(window: Window, first: Tick) -> Window:
    return Window(window.start_unix_s, window.end_unix_s, (first, *window.ticks[1:]))


def with_second_sample(window: Window, values: dict[str, float]) -> Window:
    second = Tick(window.ticks[1].t_unix_s, (GpuSample(0, values),))
    return Window(window.start_unix_s, window.end_unix_s, (window.ticks[0], second))


CHANGES: dict[str, Callable[[Window], Window]] = {
    "time": lambda w: with_first_tick(w, Tick(1700000000.15, w.ticks[0].samples)),
    "gpu-index": lambda w: with_first_tick(
        w,
        Tick(
            w.ticks[0].t_unix_s, (GpuSample(2, w.ticks[0].samples[0].values), w.ticks[0].samples[1])
        ),
    ),
    "value-last-bit": lambda w: with_second_sample(
        w, {"power_w": math.nextafter(1e-07, 1.0), "util_gpu_pct": 0.0}
    ),
    "sign-of-zero": lambda w: with_second_sample(w, {"power_w": 1e-07, "util_gpu_pct": -0.0}),
    "field-dropped": lambda w: with_second_sample(w, {"power_w": 1e-07}),
    "field-renamed": lambda w: with_second_sample(w, {"power_avg_w": 1e-07, "util_gpu_pct": 0.0}),
    "tick-removed": lambda w: Window(w.start_unix_s, w.end_unix_s, w.ticks[:1]),
}


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_any_change_to_the_samples_changes_the_digest(change: Callable[[Window], Window]) -> None:
    original = hashlib.sha256(raw_samples_bytes(small_window())).digest()
    changed = hashlib.sha256(raw_samples_bytes(change(small_window()))).digest()
    assert changed != original
