"""Cut a stream of ticks into aligned, non-overlapping windows and expose per-GPU series.

Windows are half-open intervals ``[k * window_s, (k + 1) * window_s)`` on the tick clock
(``Tick.t_unix_s``), so every agent with the same window length cuts time at the same
instants and consecutive windows tile time exactly. A window holds only the ticks that fell
into it; a stall in the tick stream produces no empty windows (a gap stays a gap, and the
verifier sees it as missing time rather than as an idle GPU).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.samples import Tick
from proto.errors import GpuattestError
from proto.limits import DEFAULT_LIMITS

# Name of the byte format produced by raw_samples_bytes; bump it if the format ever changes.
RAW_SAMPLES_FORMAT = "gpuattest-raw-samples-csv/1"

FloatArray = npt.NDArray[np.float64]


class WindowSizeError(GpuattestError, ValueError):
    """A window length that is not a finite number in (0, max_window_seconds]."""


@dataclass(frozen=True, eq=False)
class GpuSeries:
    """One GPU's samples within one window, as column arrays.

    ``t`` is seconds since ``start_unix_s`` (small offsets keep float64 arithmetic exact
    enough for slopes and resampling), sorted ascending. ``values`` maps each field that
    appeared at least once in the window to an array aligned with ``t``; an entry is NaN
    where that sample lacked the field or held a non-finite reading. The arrays are
    read-only and the mapping must not be changed: features may cache results per series.
    Equality and hashing are by identity (element-wise array equality has no single truth).
    """

    start_unix_s: float
    duration_s: float
    t: FloatArray
    values: dict[str, FloatArray] = field(default_factory=dict)

    @property
    def sample_count(self) -> int:
        """Number of samples of this GPU in the window."""
        return int(self.t.size)


@dataclass(frozen=True)
class Window:
    """The ticks whose time lies in ``[start_unix_s, end_unix_s)``, in arrival order."""

    start_unix_s: float
    end_unix_s: float
    ticks: tuple[Tick, ...]

    @property
    def duration_s(self) -> float:
        """Nominal length of the window (the last window may be only partly covered)."""
        return self.end_unix_s - self.start_unix_s

    def gpu_indices(self) -> tuple[int, ...]:
        """Sorted indices of the GPUs with at least one sample in the window."""
        return tuple(sorted({s.gpu_index for tick in self.ticks for s in tick.samples}))

    def series(self, gpu_index: int) -> GpuSeries:
        """Column arrays of one GPU's samples; empty (no samples, no fields) if it has none."""
        times: list[float] = []
        rows: list[dict[str, float]] = []
        for tick in self.ticks:
            for sample in tick.samples:
                if sample.gpu_index == gpu_index:
                    times.append(tick.t_unix_s - self.start_unix_s)
                    rows.append(sample.values)
        # Stable sort: ticks from the assembler are already ordered, hand-built windows may not be.
        order = np.argsort(np.asarray(times, dtype=np.float64), kind="stable")
        t = _read_only(np.asarray(times, dtype=np.float64)[order])
        names = sorted({name for row in rows for name in row})
        values = {name: _read_only(_column(rows, name)[order]) for name in names}
        return GpuSeries(self.start_unix_s, self.duration_s, t, values)


def _column(rows: list[dict[str, float]], name: str) -> FloatArray:
    """One field across rows as float64, NaN where absent or not a finite reading."""
    column = np.array([row.get(name, math.nan) for row in rows], dtype=np.float64)
    column[~np.isfinite(column)] = math.nan
    return column


def _read_only(array: FloatArray) -> FloatArray:
    array.setflags(write=False)
    return array


class WindowAssembler:
    """Groups ticks into aligned windows of ``window_s`` seconds.

    Ticks must arrive in non-decreasing time. A tick earlier than the latest accepted one,
    a tick with a non-finite time, and a tick that falls into a window already handed out
    (possible only after :meth:`flush`) are dropped and counted in :attr:`dropped_ticks`,
    never raised: a clock step on the host must not stop attestation.
    """

    def __init__(self, window_s: float) -> None:
        max_s = DEFAULT_LIMITS.max_window_seconds
        if not (math.isfinite(window_s) and 0.0 < window_s <= max_s):
            raise WindowSizeError(f"window_s must be in (0, {max_s}], got {window_s!r}")
        self._window_s = float(window_s)
        self._open_index: int | None = None
        self._open_ticks: list[Tick] = []
        self._last_t: float | None = None
        self._emitted_through: int | None = None
        self._dropped = 0

    @property
    def window_s(self) -> float:
        """Window length in seconds."""
        return self._window_s

    @property
    def dropped_ticks(self) -> int:
        """Ticks refused so far because they were late, out of order or had no valid time."""
        return self._dropped

    def add(self, tick: Tick) -> list[Window]:
        """Accept one tick; return the windows it completed (empty or one window)."""
        t = tick.t_unix_s
        if not math.isfinite(t) or (self._last_t is not None and t < self._last_t):
            self._dropped += 1
            return []
        index = self._index_of(t)
        if self._emitted_through is not None and index <= self._emitted_through:
            self._dropped += 1
            return []
        self._last_t = t
        completed: list[Window] = []
        if self._open_index is not None and index != self._open_index:
            completed.append(self._close())
        self._open_index = index
        self._open_ticks.append(tick)
        return completed

    def flush(self) -> Window | None:
        """Hand out the open, partly filled window, if any (e.g. at shutdown)."""
        if self._open_index is None:
            return None
        return self._close()

    def _close(self) -> Window:
        assert self._open_index is not None
        index = self._open_index
        window = Window(
            start_unix_s=index * self._window_s,
            end_unix_s=(index + 1) * self._window_s,
            ticks=tuple(self._open_ticks),
        )
        self._emitted_through = index
        self._open_index = None
        self._open_ticks = []
        return window

    def _index_of(self, t: float) -> int:
        """Index k of the window with ``k * window_s <= t < (k + 1) * window_s``.

        The division can round across a boundary, so the guess is corrected against the
        very products used as window bounds: membership then agrees with the bounds exactly.
        """
        index = math.floor(t / self._window_s)
        if t < index * self._window_s:
            return index - 1
        if t >= (index + 1) * self._window_s:
            return index + 1
        return index


def raw_samples_bytes(window: Window) -> bytes:
    """Canonical bytes of a window's raw samples (format ``gpuattest-raw-samples-csv/1``).

    The SHA-256 of these bytes is the evidence's raw-sample digest, and the bytes are what
    the agent keeps for an audit pull, so the format is fixed:

    - UTF-8 CSV (RFC 4180 quoting, only needed for unusual field names), ``\\n`` line ends,
      a trailing ``\\n`` after every row.
    - Header: ``t_s,gpu,`` then the sorted union of the field names of every sample in the
      window. With no samples the header is ``t_s,gpu``.
    - One row per sample: ticks in window order, samples within a tick by GPU index (ties
      keep their order). ``t_s`` is the tick's absolute ``t_unix_s``; ``gpu`` is the decimal
      index; a field the sample lacked is an empty cell.
    - Numbers are Python ``repr(float(x))``: the shortest text that round-trips to the same
      float64 (``1.0``, ``0.1``, ``1700000000.25``, ``1e-07``, ``nan``, ``inf``, ``-0.0``).
    """
    names = sorted({name for tick in window.ticks for s in tick.samples for name in s.values})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["t_s", "gpu", *names])
    for tick in window.ticks:
        t_text = repr(float(tick.t_unix_s))
        for sample in sorted(tick.samples, key=lambda s: s.gpu_index):
            cells = [repr(float(sample.values[n])) if n in sample.values else "" for n in names]
            writer.writerow([t_text, str(int(sample.gpu_index)), *cells])
    return buffer.getvalue().encode("utf-8")
