"""Replay recorded GPU telemetry: nvidia-smi CSV logs and the project's canonical traces.

:func:`parse_recording` reads either shape (``docs/trace-format.md``):

* nvidia-smi ``--query-gpu=... --format=csv`` logs as they come off real hosts: plain or gzip,
  units in the header or in the values, with or without ``index``/``uuid`` columns, and the
  glitches such logs carry (``[N/A]``, impossible readings, logger stalls, a truncated last line);
* the canonical ``gpuattest-trace v1`` CSV written by :func:`write_canonical_trace`.

:class:`ReplayCollector` turns a parsed :class:`Recording` back into ticks on the wall clock.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from agent.samples import (
    SAMPLE_FIELDS,
    GpuDescription,
    GpuProcess,
    GpuSample,
    HostDescription,
    Tick,
)
from proto.errors import GpuattestError

CANONICAL_MAGIC = "# gpuattest-trace v1"
_CANONICAL_PREFIX = "# gpuattest-trace"
CANONICAL_TIME_COLUMN = "t_s"
CANONICAL_GPU_COLUMN = "gpu"
SYNTHETIC_PREFIX = "synthetic-"

_GZIP_MAGIC = b"\x1f\x8b"
# A row more than this fraction of the sampling interval after the previous one starts a new
# tick: nvidia-smi reads the GPUs of one tick within milliseconds of each other.
_JUMP_FRACTION = 0.5
# Rows inspected to infer the GPU count of a log without index/uuid columns.
_DETECTION_ROWS = 4096
_MAX_SLOTTED_GPUS = 64
# Inferring n GPUs from a median tick period is only trusted when the mean period agrees:
# reading 8 GPUs as 1 gives a median of milliseconds but a mean of interval/8.
_MAX_MEAN_TO_MEDIAN = 2.5
# Share of rows that must sit in runs of exactly n rows (between time jumps) to accept n.
_MIN_ROWS_IN_RUNS = 0.6
# No logger samples faster: NVML's counters refresh every 20-100 ms. A shorter "period" means
# the rows being compared belong to one tick.
_MIN_INTERVAL_S = 0.01
# When no GPU count is consistent (a handful of rows), rows closer than this form one tick.
_FALLBACK_TICK_SPREAD_S = 0.02
_CELL_CACHE_LIMIT = 65536
# A gap between ticks longer than this many intervals is counted as a logger stall.
_STALL_INTERVALS = 5.0


class RecordingFormatError(GpuattestError):
    """A file is not a telemetry recording this parser understands."""


class Glitch(StrEnum):
    """Defects the parser tolerates; each is counted in :attr:`Recording.glitches`."""

    NOT_AVAILABLE = "not_available"  # [N/A]: the reading is missing
    NOT_SUPPORTED = "not_supported"  # [Not Supported]
    UNKNOWN_ERROR = "unknown_error"  # [Unknown Error], [GPU is lost], other bracketed errors
    EMPTY = "empty"  # an empty cell
    UNPARSEABLE = "unparseable"  # text that is not a number with a known unit
    OUT_OF_RANGE = "out_of_range"  # a number no GPU reports (util of 1e6 %, -5 W, NaN)
    BAD_TIMESTAMP = "bad_timestamp"  # the row is dropped
    BAD_GPU_ID = "bad_gpu_id"  # unreadable index/uuid/gpu cell: the row is dropped
    NON_MONOTONIC = "non_monotonic"  # a row earlier than the row before it: dropped
    MALFORMED_ROW = "malformed_row"  # wrong number of cells: dropped
    TRUNCATED_LINE = "truncated_line"  # the last line, cut short by a killed logger: dropped
    REPEATED_HEADER = "repeated_header"  # a logger restarted appending to the same file
    CHANGED_HEADER = "changed_header"  # a different header mid-file: the rest is ignored
    DUPLICATE_ROW = "duplicate_row"  # canonical trace: one GPU twice at one t_s; dropped
    TICK_NOT_AFTER_PREVIOUS = "tick_not_after_previous"  # tick times must increase: dropped
    STALL = "stall"  # a gap of > 5 intervals between ticks; kept as a gap, nothing filled in
    TRUNCATED_STREAM = "truncated_stream"  # a gzip stream cut short: what decoded is used
    NUL_BYTES = "nul_bytes"  # NUL bytes in the text (disk-full or crash debris), removed


# ---------------------------------------------------------------------------------------------
# Field names and units
# ---------------------------------------------------------------------------------------------

_MIB = 1024.0 * 1024.0
_POWER_UNITS = {"W": 1.0, "mW": 1e-3, "kW": 1e3}
_PERCENT_UNITS = {"%": 1.0}
_MIB_UNITS = {
    "B": 1.0 / _MIB,
    "KiB": 1.0 / 1024.0,
    "MiB": 1.0,
    "GiB": 1024.0,
    "TiB": _MIB,
    "KB": 1e3 / _MIB,
    "MB": 1e6 / _MIB,
    "GB": 1e9 / _MIB,
}
_ENERGY_UNITS = {"mJ": 1.0, "J": 1e3, "kJ": 1e6, "Wh": 3.6e6, "kWh": 3.6e9}
_CLOCK_UNITS = {"MHz": 1.0, "GHz": 1e3, "kHz": 1e-3, "Hz": 1e-6}
_TEMPERATURE_UNITS = {"C": 1.0, "°C": 1.0}
_KIB_RATE_UNITS = {
    "KiB/s": 1.0,
    "B/s": 1.0 / 1024.0,
    "MiB/s": 1024.0,
    "GiB/s": _MIB,
    "KB/s": 1e3 / 1024.0,
    "MB/s": 1e6 / 1024.0,
    "GB/s": 1e9 / 1024.0,
}
_KIB_UNITS = {"KiB": 1.0, "B": 1.0 / 1024.0, "MiB": 1024.0, "GiB": _MIB, "TiB": _MIB * 1024.0}
_BITMASK_UNITS: dict[str, float] = {}


@dataclass(frozen=True)
class _FieldRule:
    """Units a field may carry (unit -> factor to the canonical unit) and its plausible range."""

    units: Mapping[str, float]
    low: float
    high: float
    is_bitmask: bool = False


_TIB_IN_MIB = _MIB
# The range is what hardware can physically report; anything outside is a glitch, not a reading.
_FIELD_RULES: dict[str, _FieldRule] = {
    "power_w": _FieldRule(_POWER_UNITS, 0.0, 2000.0),
    "power_avg_w": _FieldRule(_POWER_UNITS, 0.0, 2000.0),
    "energy_mj": _FieldRule(_ENERGY_UNITS, 0.0, 1e18),
    "util_gpu_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
    "util_mem_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
    "mem_used_mib": _FieldRule(_MIB_UNITS, 0.0, _TIB_IN_MIB),
    "mem_total_mib": _FieldRule(_MIB_UNITS, 0.0, _TIB_IN_MIB),
    "sm_clock_mhz": _FieldRule(_CLOCK_UNITS, 0.0, 10_000.0),
    "mem_clock_mhz": _FieldRule(_CLOCK_UNITS, 0.0, 20_000.0),
    "temperature_c": _FieldRule(_TEMPERATURE_UNITS, -50.0, 150.0),
    "throttle_reasons": _FieldRule(_BITMASK_UNITS, 0.0, float(2**64 - 1), is_bitmask=True),
    "pcie_tx_kib_s": _FieldRule(_KIB_RATE_UNITS, 0.0, 1e9),
    "pcie_rx_kib_s": _FieldRule(_KIB_RATE_UNITS, 0.0, 1e9),
    "nvlink_tx_kib": _FieldRule(_KIB_UNITS, 0.0, 1e18),
    "nvlink_rx_kib": _FieldRule(_KIB_UNITS, 0.0, 1e18),
    "sm_active_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
    "sm_occupancy_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
    "tensor_active_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
    "dram_bw_pct": _FieldRule(_PERCENT_UNITS, 0.0, 100.0),
}

# nvidia-smi --query-gpu names (case-folded) -> (canonical field, rank). When two columns map to
# one field the lower rank wins: power.draw.instant is the true instantaneous reading on drivers
# where plain power.draw has become a 1 s average.
_NVSMI_FIELDS: dict[str, tuple[str, int]] = {
    "power.draw.instant": ("power_w", 0),
    "power.draw": ("power_w", 1),
    "power.draw.average": ("power_avg_w", 0),
    "utilization.gpu": ("util_gpu_pct", 0),
    "utilization.memory": ("util_mem_pct", 0),
    "memory.used": ("mem_used_mib", 0),
    "memory.total": ("mem_total_mib", 0),
    "clocks.current.sm": ("sm_clock_mhz", 0),
    "clocks.sm": ("sm_clock_mhz", 0),
    "clocks.current.memory": ("mem_clock_mhz", 0),
    "clocks.mem": ("mem_clock_mhz", 0),
    "temperature.gpu": ("temperature_c", 0),
    "clocks_event_reasons.active": ("throttle_reasons", 0),
    "clocks_throttle_reasons.active": ("throttle_reasons", 0),
    # Energy and PCIe throughput are not in every nvidia-smi; these are the names loggers use.
    "total_energy_consumption": ("energy_mj", 0),
    "energy.total": ("energy_mj", 0),
    "pcie.tx_throughput": ("pcie_tx_kib_s", 0),
    "pcie.rx_throughput": ("pcie_rx_kib_s", 0),
    **{name: (name, 0) for name in SAMPLE_FIELDS},  # canonical names are accepted as they are
}
# Special columns, in order of preference when a header has more than one of a kind.
_TIME_COLUMNS = ("timestamp", CANONICAL_TIME_COLUMN)
_INDEX_COLUMNS = ("index", CANONICAL_GPU_COLUMN)
_IDENTITY_COLUMNS = ("uuid", "gpu_uuid", "pci.bus_id", "gpu_bus_id")

_MISSING_MARKERS: dict[str, Glitch] = {
    "n/a": Glitch.NOT_AVAILABLE,
    "na": Glitch.NOT_AVAILABLE,
    "not supported": Glitch.NOT_SUPPORTED,
    "unknown error": Glitch.UNKNOWN_ERROR,
}
_HEADER_UNIT = re.compile(r"(?P<name>.*?)\s*\[(?P<unit>[^\]]*)\]\s*")
_NUMBER_WITH_UNIT = re.compile(
    r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>\S+)"
)


# ---------------------------------------------------------------------------------------------
# The parsed recording
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """A parsed telemetry recording; tick times are as read from the file (not rebased)."""

    source: str  # the file path, or the canonical trace's source= text, or a generator's name
    path: Path | None
    ticks: tuple[Tick, ...]
    gpu_count: int
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]  # by position in gpu_indices; empty when the file has none
    fields: tuple[str, ...]  # canonical fields the file has columns for, in SAMPLE_FIELDS order
    ignored_columns: tuple[str, ...]  # header cells that map to no canonical field
    glitches: Mapping[str, int]  # Glitch value -> count
    is_synthetic: bool
    interval_s: float  # median spacing of ticks, 0.0 with fewer than two ticks
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last tick."""
        return self.ticks[-1].t_unix_s - self.ticks[0].t_unix_s if self.ticks else 0.0


# ---------------------------------------------------------------------------------------------
# Reading bytes into lines
# ---------------------------------------------------------------------------------------------


def _read_text(path: Path, glitches: Counter[str]) -> str:
    """File content as text: gzip is recognised by its magic bytes, whatever the name says."""
    data = path.read_bytes()
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip_salvaging(data, glitches)
    text = data.decode("utf-8-sig", errors="replace")
    if "\x00" in text:
        glitches[Glitch.NUL_BYTES] += 1
        text = text.replace("\x00", "")
    return text


def _gunzip_salvaging(data: bytes, glitches: Counter[str]) -> bytes:
    """Decompress every gzip member; a stream cut short yields what it holds so far."""
    parts: list[bytes] = []
    while data.startswith(_GZIP_MAGIC):
        decompressor = zlib.decompressobj(wbits=31)
        try:
            parts.append(decompressor.decompress(data))
        except zlib.error:
            glitches[Glitch.TRUNCATED_STREAM] += 1
            break
        if not decompressor.eof:
            glitches[Glitch.TRUNCATED_STREAM] += 1
            break
        data = decompressor.unused_data
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Header layout and cell parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ValueColumn:
    position: int
    field: str
    header_scale: float  # factor from the header's unit to the canonical unit
    rule: _FieldRule


@dataclass(frozen=True)
class _Layout:
    header: tuple[str, ...]
    time_position: int
    index_position: int | None
    identity_position: int | None
    columns: tuple[_ValueColumn, ...]
    ignored: tuple[str, ...]

    @property
    def width(self) -> int:
        return len(self.header)

    @property
    def key_position(self) -> int | None:
        return self.index_position if self.index_position is not None else self.identity_position


def _split_header_cell(cell: str) -> tuple[str, str | None]:
    """``"power.draw [W]"`` -> ``("power.draw", "W")``; names are case-folded."""
    cell = cell.strip()
    match = _HEADER_UNIT.fullmatch(cell)
    if match is None:
        return cell.casefold(), None
    return match["name"].casefold(), match["unit"].strip()


def _parse_layout(header: Sequence[str]) -> _Layout:
    names = [_split_header_cell(cell) for cell in header]
    positions = {name: position for position, (name, _) in reversed(list(enumerate(names)))}
    time_position = next((positions[n] for n in _TIME_COLUMNS if n in positions), None)
    if time_position is None:
        raise RecordingFormatError(f"no timestamp column in header {list(header)!r}")
    special = {time_position}
    index_position = next((positions[n] for n in _INDEX_COLUMNS if n in positions), None)
    identity_position = next((positions[n] for n in _IDENTITY_COLUMNS if n in positions), None)
    special.update(p for p in (index_position, identity_position) if p is not None)
    columns, ignored = _value_columns(header, names, special)
    return _Layout(
        header=tuple(cell.strip() for cell in header),
        time_position=time_position,
        index_position=index_position,
        identity_position=identity_position,
        columns=columns,
        ignored=ignored,
    )


def _value_columns(
    header: Sequence[str], names: Sequence[tuple[str, str | None]], special: set[int]
) -> tuple[tuple[_ValueColumn, ...], tuple[str, ...]]:
    """Map header cells to canonical fields; the best-ranked column wins a field."""
    best: dict[str, tuple[int, _ValueColumn]] = {}
    ignored: list[str] = []
    for position, (name, unit) in enumerate(names):
        if position in special:
            continue
        mapped = _NVSMI_FIELDS.get(name)
        rule = _FIELD_RULES[mapped[0]] if mapped else None
        scale = _header_scale(rule, unit) if rule else None
        if mapped is None or rule is None or scale is None:
            ignored.append(header[position].strip())
            continue
        canonical, rank = mapped
        candidate = (rank, _ValueColumn(position, canonical, scale, rule))
        previous = best.get(canonical)
        if previous is None or rank < previous[0]:
            if previous is not None:
                ignored.append(header[previous[1].position].strip())
            best[canonical] = candidate
        else:
            ignored.append(header[position].strip())
    order = {name: i for i, name in enumerate(SAMPLE_FIELDS)}
    columns = sorted((column for _, column in best.values()), key=lambda c: order[c.field])
    return tuple(columns), tuple(ignored)


def _header_scale(rule: _FieldRule, unit: str | None) -> float | None:
    """Factor for unit-less values under a header unit; None for a unit the field cannot have."""
    if unit is None or unit == "" or rule.is_bitmask:
        return 1.0
    return rule.units.get(unit)


def _parse_cell(cell: str, column: _ValueColumn) -> float | Glitch:
    """One reading in canonical units, or the kind of glitch that stands in its place."""
    try:
        value = float(cell) * column.header_scale
    except ValueError:
        parsed = _parse_text_cell(cell, column.rule)
        if isinstance(parsed, Glitch):
            return parsed
        value = parsed
    rule = column.rule
    if not rule.low <= value <= rule.high:  # also rejects NaN
        return Glitch.OUT_OF_RANGE
    return value


def _parse_text_cell(cell: str, rule: _FieldRule) -> float | Glitch:
    text = cell.strip()
    if not text:
        return Glitch.EMPTY
    number, _, unit = text.rpartition(" ")
    factor = rule.units.get(unit)
    if factor is not None:  # the common "71.25 W" shape, without the regex
        try:
            return float(number) * factor
        except ValueError:
            pass
    marker = _MISSING_MARKERS.get(text.strip("[]").strip().casefold())
    if marker is not None:
        return marker
    if text.startswith("["):
        return Glitch.UNKNOWN_ERROR
    if rule.is_bitmask:
        try:
            return float(int(text, 0))  # "0x0000000000000004"
        except ValueError:
            return Glitch.UNPARSEABLE
    match = _NUMBER_WITH_UNIT.fullmatch(text)
    factor = rule.units.get(match["unit"]) if match else None
    if match is None or factor is None:
        return Glitch.UNPARSEABLE
    return float(match["number"]) * factor


def _parse_timestamp(text: str) -> float | None:
    """Seconds from ``YYYY/MM/DD HH:MM:SS.mmm``, ISO 8601 or plain epoch seconds.

    nvidia-smi writes local wall time without a zone; it is read as if it were UTC, which keeps
    the spacing of ticks exact (the replay rebases everything onto the wall clock anyway).
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("/", "-", 2))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    """One CSV row. ``time`` None: the row holds a GPU's place but its readings are dropped."""

    time: float | None
    key: int | str | None  # the GPU index, else its uuid; None when the file has neither
    values: dict[str, float]
    identity: str | None = None  # the uuid (or PCI bus id) cell, when the file has one
    starts_segment: bool = False  # a repeated header came before it: a new tick must start


class _RowReader:
    """Turns CSV lines after the header into rows, counting glitches as it goes."""

    def __init__(self, layout: _Layout, glitches: Counter[str], canonical: bool) -> None:
        self._layout = layout
        self._glitches = glitches
        # In a canonical trace an empty cell is how a missing reading is written, not a defect.
        self._uncounted = frozenset({Glitch.EMPTY}) if canonical else frozenset()
        # Readings repeat a lot ("0 %", "17 MiB"): parsing each distinct cell text once per
        # column keeps a 55k-row log well under a second.
        self._cell_caches: list[dict[str, float | Glitch]] = [{} for _ in layout.columns]
        self._last_time = -math.inf
        self._cached_text = ""
        self._cached_time: float | None = None
        self._previous_cells: list[str] | None = None

    def read(self, lines: Sequence[str], last_line_complete: bool) -> list[_Row]:
        rows: list[_Row] = []
        new_segment = False
        reader = csv.reader(lines, skipinitialspace=True, quoting=csv.QUOTE_NONE, strict=False)
        for number, cells in enumerate(reader):
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if self._is_header(cells):
                if tuple(c.strip() for c in cells) != self._layout.header:
                    self._glitches[Glitch.CHANGED_HEADER] += 1
                    break
                self._glitches[Glitch.REPEATED_HEADER] += 1
                new_segment = True
                continue
            is_last = number == len(lines) - 1
            row = self._read_row(cells, truncated=is_last and not last_line_complete)
            row.starts_segment = new_segment
            new_segment = False
            rows.append(row)
        return rows

    def _is_header(self, cells: Sequence[str]) -> bool:
        position = self._layout.time_position
        if len(cells) <= position or cells[position][:1].isdigit():
            return False  # the usual data row, decided without parsing
        return _split_header_cell(cells[position])[0] in _TIME_COLUMNS

    def _read_row(self, cells: list[str], truncated: bool) -> _Row:
        if truncated and self._looks_cut(cells):
            self._glitches[Glitch.TRUNCATED_LINE] += 1
            return _Row(None, None, {})
        if len(cells) != self._layout.width:
            self._glitches[Glitch.MALFORMED_ROW] += 1
            return _Row(None, None, {})
        self._previous_cells = cells
        gpu_id = self._read_gpu_id(cells)
        time = self._read_time(cells[self._layout.time_position])
        if time is None or gpu_id is None:
            return _Row(None, None, {})
        values: dict[str, float] = {}
        for column, cache in zip(self._layout.columns, self._cell_caches, strict=True):
            cell = cells[column.position]
            parsed = cache.get(cell)
            if parsed is None:
                parsed = _parse_cell(cell, column)
                if len(cache) < _CELL_CACHE_LIMIT:
                    cache[cell] = parsed
            if isinstance(parsed, Glitch):
                if parsed not in self._uncounted:
                    self._glitches[parsed] += 1
            else:
                values[column.field] = parsed
        return _Row(time, gpu_id[0], values, identity=gpu_id[1])

    def _looks_cut(self, cells: list[str]) -> bool:
        """A last line without newline is cut if its shape differs from the line before."""
        if len(cells) != self._layout.width:
            return True
        if _parse_timestamp(cells[self._layout.time_position]) is None:
            return True
        previous = self._previous_cells
        return previous is not None and any(
            _ends_in_unit(cells[c.position]) != _ends_in_unit(previous[c.position])
            for c in self._layout.columns
        )

    def _read_gpu_id(self, cells: list[str]) -> tuple[int | str | None, str | None] | None:
        """(key, identity) of the row's GPU; None when the file names GPUs but this row's is bad."""
        layout = self._layout
        identity = None
        if layout.identity_position is not None:
            text = cells[layout.identity_position].strip()
            identity = text if text and not text.startswith("[") else None
        if layout.index_position is not None:
            try:
                return int(cells[layout.index_position]), identity
            except ValueError:
                pass
        elif layout.identity_position is None:
            return None, None
        elif identity is not None:
            return identity, identity
        self._glitches[Glitch.BAD_GPU_ID] += 1
        return None

    def _read_time(self, text: str) -> float | None:
        if text != self._cached_text:  # rows of one tick often share the timestamp text
            self._cached_text, self._cached_time = text, _parse_timestamp(text)
        time = self._cached_time
        if time is None:
            self._glitches[Glitch.BAD_TIMESTAMP] += 1
            return None
        if time < self._last_time:
            self._glitches[Glitch.NON_MONOTONIC] += 1
            return None
        self._last_time = time
        return time


def _ends_in_unit(cell: str) -> bool:
    cell = cell.rstrip()
    return bool(cell) and not (cell[-1].isdigit() or cell[-1] == ".")


# ---------------------------------------------------------------------------------------------
# Grouping rows into ticks
# ---------------------------------------------------------------------------------------------

_Group = list[tuple[int, _Row]]  # (gpu index, row) pairs of one tick


def _run_sizes(times: np.ndarray, threshold: float) -> np.ndarray:
    """Lengths of the runs of rows separated by jumps larger than ``threshold``."""
    jumps = np.flatnonzero(np.diff(times) > threshold) + 1
    edges = np.concatenate(([0], jumps, [times.size]))
    return np.diff(edges)


def infer_slot_count(times: np.ndarray) -> tuple[int, float]:
    """GPU count and sampling interval of a log whose rows carry no GPU index or uuid.

    The smallest n is taken for which grouping every n rows gives a consistent tick: the median
    spacing of tick starts (the interval) is at least 10 ms and agrees with the mean spacing, and
    the rows, split wherever the time jumps by more than half that interval, mostly (60 %) sit
    in runs of exactly n. Stalls inside a tick and ticks sharing one timestamp text do not
    disturb this; it assumes the rows of one tick are milliseconds apart, as nvidia-smi writes.
    """
    window = times[:_DETECTION_ROWS]
    for count in range(1, min(_MAX_SLOTTED_GPUS, window.size // 2) + 1):
        period = _consistent_period(window, count)
        if period is not None:
            return count, period
    return _fallback_slot_count(window)


def _consistent_period(window: np.ndarray, count: int) -> float | None:
    starts = window[: window.size - window.size % count : count]
    gaps = np.diff(starts)
    if gaps.size == 0:
        return None
    period = float(np.median(gaps))
    if period < _MIN_INTERVAL_S:
        return None
    # The largest 1 % of gaps are left out of the mean: a few logger stalls must not hide the
    # right count, while the every-tick gaps of a wrong count (1/n of all gaps) still count.
    kept = np.sort(gaps)[: gaps.size - gaps.size // 100]
    if float(kept.mean()) > _MAX_MEAN_TO_MEDIAN * period:
        return None
    sizes = _run_sizes(window, _JUMP_FRACTION * period)
    rows_in_whole_ticks = int(sizes[sizes == count].sum())
    return period if rows_in_whole_ticks >= _MIN_ROWS_IN_RUNS * window.size else None


def _fallback_slot_count(window: np.ndarray) -> tuple[int, float]:
    """No count is consistent (too few rows, or stalls dominate a tiny file): the first run of
    rows less than 20 ms apart is one tick."""
    if window.size < 2:
        return max(int(window.size), 1), 0.0
    gaps = np.diff(window)
    count = int(_run_sizes(window, _FALLBACK_TICK_SPREAD_S)[0])
    between_ticks = gaps[gaps > _FALLBACK_TICK_SPREAD_S]
    return count, float(np.median(between_ticks)) if between_ticks.size else 0.0


def _group_slotted(rows: Sequence[_Row], count: int, threshold: float) -> list[_Group]:
    """Rows in GPU order without an index: row i of a tick is GPU i.

    Rows are split into runs at time jumps. A run completing a partial tick fills it (a logger
    stall inside a tick); a run of whole ticks after a partial one closes the partial tick (rows
    were lost), so the GPU order resynchronises instead of staying shifted for the rest of file.
    """
    groups: list[_Group] = []
    current: _Group = []
    for run in _runs(rows, threshold):
        size = len(run)
        if current and (run[0].starts_segment or _run_restarts_ticks(len(current), size, count)):
            groups.append(current)
            current = []
        for row in run:
            current.append((len(current), row))
            if len(current) == count:
                groups.append(current)
                current = []
    if current:
        groups.append(current)
    return groups


def _run_restarts_ticks(filled: int, size: int, count: int) -> bool:
    return (filled + size) % count != 0 and size % count == 0


def _runs(rows: Sequence[_Row], threshold: float) -> list[list[_Row]]:
    """Split rows wherever time jumps beyond ``threshold``; dropped rows never split a run."""
    runs: list[list[_Row]] = []
    previous: float | None = None
    for row in rows:
        jumped = row.time is not None and previous is not None and row.time - previous > threshold
        if not runs or jumped or row.starts_segment:
            runs.append([])
        runs[-1].append(row)
        if row.time is not None:
            previous = row.time
    return runs


def _group_keyed(
    rows: Sequence[_Row], keys: Mapping[int | str, int], threshold: float
) -> list[_Group]:
    """Rows carrying an index or uuid: a tick ends when a GPU repeats or time jumps."""
    groups: list[_Group] = []
    current: _Group = []
    seen: set[int] = set()
    start = 0.0
    for row in rows:
        if row.time is None or row.key is None:
            continue
        gpu = keys[row.key]
        if current and (row.starts_segment or gpu in seen or row.time - start > threshold):
            groups.append(current)
            current, seen = [], set()
        if not current:
            start = row.time
        current.append((gpu, row))
        seen.add(gpu)
    if current:
        groups.append(current)
    return groups


def _group_canonical(rows: Sequence[_Row], glitches: Counter[str]) -> list[_Group]:
    """Canonical traces are exact: the rows of one tick share the same ``t_s``."""
    groups: list[_Group] = []
    seen: set[int] = set()
    for row in rows:
        if row.time is None or not isinstance(row.key, int):
            continue
        if not groups or row.time != groups[-1][0][1].time:
            groups.append([])
            seen = set()
        if row.key in seen:
            glitches[Glitch.DUPLICATE_ROW] += 1
            continue
        groups[-1].append((row.key, row))
        seen.add(row.key)
    return groups


def _keyed_interval(rows: Sequence[_Row]) -> float:
    """Median time between consecutive rows of the same GPU."""
    last: dict[int | str, float] = {}
    gaps: list[float] = []
    for row in rows:
        if row.time is None or row.key is None:
            continue
        previous = last.get(row.key)
        if previous is not None:
            gaps.append(row.time - previous)
        last[row.key] = row.time
    return float(np.median(gaps)) if gaps else 0.0


def _gpu_keys(rows: Sequence[_Row], by_index: bool) -> dict[int | str, int]:
    """GPU index per key: the index itself, or uuids numbered by first appearance."""
    keys: dict[int | str, int] = {}
    for row in rows:
        if row.key is not None and row.time is not None and row.key not in keys:
            keys[row.key] = row.key if by_index and isinstance(row.key, int) else len(keys)
    return keys


def _ticks_from_groups(groups: Iterable[_Group], glitches: Counter[str]) -> list[Tick]:
    """Ticks stamped with their first row's time; tick times strictly increase."""
    ticks: list[Tick] = []
    for group in groups:
        times = [row.time for _, row in group if row.time is not None]
        if not times:
            continue
        time = _tick_time(times, ticks[-1].t_unix_s if ticks else -math.inf)
        if time is None:
            glitches[Glitch.TICK_NOT_AFTER_PREVIOUS] += 1
            continue
        timed = sorted(((gpu, row) for gpu, row in group if row.time is not None), key=_by_gpu)
        ticks.append(Tick(time, tuple(GpuSample(gpu, row.values) for gpu, row in timed)))
    return ticks


def _tick_time(times: Sequence[float], previous: float) -> float | None:
    """The first row's time; the last row's when a logger gave the first the previous tick's
    timestamp text; None when no row of the tick is later than the previous tick."""
    for candidate in (times[0], times[-1]):
        if candidate > previous:
            return candidate
    return None


def _by_gpu(pair: tuple[int, _Row]) -> int:
    return pair[0]


def _median_interval(ticks: Sequence[Tick]) -> float:
    if len(ticks) < 2:
        return 0.0
    return float(np.median(np.diff([tick.t_unix_s for tick in ticks])))


def _count_stalls(ticks: Sequence[Tick], interval: float, glitches: Counter[str]) -> None:
    if interval <= 0:
        return
    times = np.array([tick.t_unix_s for tick in ticks])
    stalls = int(np.count_nonzero(np.diff(times) > _STALL_INTERVALS * interval))
    if stalls:
        glitches[Glitch.STALL] += stalls


# ---------------------------------------------------------------------------------------------
# parse_recording
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grouped:
    groups: list[_Group]
    gpu_indices: tuple[int, ...]
    gpu_uuids: tuple[str, ...]


def parse_recording(path: Path) -> Recording:
    """Parse an nvidia-smi CSV log or a canonical trace (plain or gzip) into a Recording.

    Glitches never raise: they become missing readings or dropped rows and are counted in
    ``Recording.glitches``. Raises :class:`RecordingFormatError` only for a file that has no
    header with a timestamp column, or a canonical trace of an unknown version.
    """
    glitches: Counter[str] = Counter()
    text = _read_text(path, glitches)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None:
        raise RecordingFormatError(f"{path}: empty file")
    metadata: dict[str, str] = {}
    canonical = lines[start].startswith(_CANONICAL_PREFIX)
    if canonical:
        metadata = _parse_magic(lines[start])
    while start < len(lines) and (not lines[start].strip() or lines[start].startswith("#")):
        start += 1  # the canonical first line, other comments, blank lines
    if start >= len(lines):
        raise RecordingFormatError(f"{path}: no header line")
    layout = _parse_layout(next(csv.reader([lines[start]], skipinitialspace=True)))
    reader = _RowReader(layout, glitches, canonical)
    last_line_complete = text.endswith(("\n", "\r"))
    rows = reader.read(lines[start + 1 :], last_line_complete)
    grouped = _group_rows(rows, layout, canonical, glitches)
    ticks = _ticks_from_groups(grouped.groups, glitches)
    interval = _median_interval(ticks)
    _count_stalls(ticks, interval, glitches)
    return Recording(
        source=metadata.get("source", str(path)),
        path=path,
        ticks=tuple(ticks),
        gpu_count=len(grouped.gpu_indices),
        gpu_indices=grouped.gpu_indices,
        gpu_uuids=grouped.gpu_uuids or _uuids_from_metadata(metadata, len(grouped.gpu_indices)),
        fields=tuple(column.field for column in layout.columns),
        ignored_columns=layout.ignored,
        glitches={str(kind): count for kind, count in glitches.items()},
        is_synthetic=metadata.get("synthetic") == "true" or path.name.startswith(SYNTHETIC_PREFIX),
        interval_s=interval,
        metadata=metadata,
    )


def _group_rows(
    rows: Sequence[_Row], layout: _Layout, canonical: bool, glitches: Counter[str]
) -> _Grouped:
    if canonical and layout.index_position is not None:
        groups = _group_canonical(rows, glitches)
        indices = sorted({gpu for group in groups for gpu, _ in group})
        return _Grouped(groups, tuple(indices), ())
    if layout.key_position is not None:
        return _group_by_key(rows, layout)
    times = np.array([row.time for row in rows if row.time is not None], dtype=float)
    if times.size == 0:
        return _Grouped([], (), ())
    count, interval = infer_slot_count(times)
    threshold = _JUMP_FRACTION * interval if interval > 0 else _FALLBACK_TICK_SPREAD_S
    return _Grouped(_group_slotted(rows, count, threshold), tuple(range(count)), ())


def _group_by_key(rows: Sequence[_Row], layout: _Layout) -> _Grouped:
    by_index = layout.index_position is not None
    keys = _gpu_keys(rows, by_index)
    interval = _keyed_interval(rows)
    threshold = _JUMP_FRACTION * interval if interval > 0 else math.inf
    groups = _group_keyed(rows, keys, threshold)
    indices = tuple(sorted(set(keys.values())))
    uuids: tuple[str, ...] = ()
    if layout.identity_position is not None and not by_index:
        uuids = tuple(str(key) for key in keys)  # numbered by first appearance
    elif layout.identity_position is not None:
        uuids = _uuids_by_index(rows, indices)
    return _Grouped(groups, indices, uuids)


def _uuids_by_index(rows: Sequence[_Row], indices: Sequence[int]) -> tuple[str, ...]:
    """The uuid each GPU index was last seen with ("" if never)."""
    found = {row.key: row.identity for row in rows if isinstance(row.key, int) and row.identity}
    return tuple(found.get(index) or "" for index in indices)


def _uuids_from_metadata(metadata: Mapping[str, str], count: int) -> tuple[str, ...]:
    text = metadata.get("gpu_uuids", "")
    uuids = tuple(text.split(",")) if text else ()
    return uuids if len(uuids) == count else ()


# ---------------------------------------------------------------------------------------------
# The canonical trace format
# ---------------------------------------------------------------------------------------------

_METADATA_KEY = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED_KEYS = frozenset({"source", "synthetic", "gpu_uuids"})


def _parse_magic(line: str) -> dict[str, str]:
    """``# gpuattest-trace v1 source=... synthetic=true k=v`` -> its key/value pairs."""
    tokens = line.split()
    if " ".join(tokens[:3]) != CANONICAL_MAGIC:
        raise RecordingFormatError(f"unsupported trace header {line[:60]!r}")
    metadata: dict[str, str] = {}
    for token in tokens[3:]:
        key, separator, value = token.partition("=")
        if separator:
            metadata[unquote(key)] = unquote(value)
    return metadata


def _format_magic(
    source: str, synthetic: bool, gpu_uuids: Sequence[str], metadata: Mapping[str, str]
) -> str:
    pairs = {"source": source, "synthetic": "true" if synthetic else "false"}
    if gpu_uuids:
        pairs["gpu_uuids"] = ",".join(gpu_uuids)
    for key, value in metadata.items():
        if key in _RESERVED_KEYS or not _METADATA_KEY.fullmatch(key):
            raise ValueError(f"invalid trace metadata key {key!r}")
        pairs[key] = value
    # Percent-encoding keeps spaces and '=' out of values, so the line splits unambiguously.
    encoded = " ".join(f"{key}={quote(value, safe='')}" for key, value in pairs.items())
    return f"{CANONICAL_MAGIC} {encoded}"


def _format_number(value: float) -> str:
    if not math.isfinite(value):
        return ""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _trace_fields(ticks: Sequence[Tick]) -> list[str]:
    present = {name for tick in ticks for sample in tick.samples for name in sample.values}
    unknown = present - SAMPLE_FIELDS.keys()
    if unknown:
        raise ValueError(f"not canonical sample fields: {sorted(unknown)}")
    return [name for name in SAMPLE_FIELDS if name in present]


def write_canonical_trace(
    path: Path,
    ticks: Iterable[Tick],
    source: str,
    synthetic: bool,
    *,
    gpu_uuids: Sequence[str] = (),
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ticks as a canonical trace; gzip when the name ends in ``.gz``. Returns ``path``.

    One row per GPU per tick; a missing reading is an empty cell. Ticks without samples
    cannot be represented and are left out. ``metadata`` adds ``key=value`` pairs to the first
    line (keys: lower-case letters, digits and ``_``). The file is replaced atomically.
    """
    materialised = list(ticks)
    fields = _trace_fields(materialised)
    buffer = io.StringIO()
    buffer.write(_format_magic(source, synthetic, gpu_uuids, metadata or {}) + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([CANONICAL_TIME_COLUMN, CANONICAL_GPU_COLUMN, *fields])
    for tick in materialised:
        time = repr(float(tick.t_unix_s))
        for sample in tick.samples:
            cells = [_format_number(sample.values[f]) if f in sample.values else "" for f in fields]
            writer.writerow([time, str(sample.gpu_index), *cells])
    data = buffer.getvalue().encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: identical input gives identical bytes
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------
# ReplayCollector
# ---------------------------------------------------------------------------------------------


class ReplayCollector:
    """A :class:`~agent.samples.Collector` that hands out a recording's ticks on the wall clock.

    It never sleeps: the daemon paces with :meth:`pace_delay`. Tick spacing is always the
    recorded spacing, so features see the real rhythm whatever the speed. Where the recording
    lands on the wall clock depends on the speed:

    * ``speed <= 1``: the first tick maps to the clock's time at creation; as the daemon paces in
      real time (or slower), each tick is handed out no earlier than its timestamp.
    * ``speed > 1`` (and 0 or inf, "as fast as possible"): the *last* tick maps to creation
      time, so the whole recording lies in the past. Mapping the first tick instead would stamp
      later ticks minutes ahead of the clock, and the verifier rejects windows from the future.
    """

    def __init__(
        self,
        recording: Recording,
        clock: Callable[[], float],
        speed: float = 1.0,
        hostname: str = "replay",
        gpu_name: str = "unknown",
    ) -> None:
        if math.isnan(speed) or speed < 0:
            raise ValueError(f"replay speed must be >= 0 (0 = as fast as possible), got {speed}")
        self.source = "synthetic-replay" if recording.is_synthetic else "replay"
        self._speed = math.inf if speed == 0 else speed
        self._host = _recorded_host(recording, hostname, gpu_name)
        # The daemon holds the recording for its whole run: keep it as arrays, not as one
        # Python object per reading (a 10-minute 8-GPU log is ~20 MB of objects, ~4 MB here).
        self._ticks = CompactTicks(recording.ticks)
        self._next = 0
        created = clock()
        times = self._ticks.times
        anchor = float(times[0] if self._speed <= 1 else times[-1]) if len(times) else created
        self._offset = created - anchor

    @property
    def speed(self) -> float:
        """Replay rate relative to real time; ``inf`` for as fast as possible."""
        return self._speed

    def describe_host(self) -> HostDescription:
        """GPUs of the recording: recorded uuids, else ``replay-gpu-<n>``; no driver facts."""
        return self._host

    def read_tick(self) -> Tick | None:
        """The next tick rebased onto the wall clock, or None once the recording is over."""
        if self._next >= len(self._ticks):
            return None
        tick = self._ticks.tick(self._next, self._offset)
        self._next += 1
        return tick

    def pace_delay(self, previous_tick: Tick | None, tick: Tick) -> float:
        """Seconds the daemon should wait before handing on ``tick``: recorded gap / speed."""
        if previous_tick is None or math.isinf(self._speed):
            return 0.0
        return max(0.0, tick.t_unix_s - previous_tick.t_unix_s) / self._speed

    def processes(self) -> list[GpuProcess]:
        """Recordings hold no processes."""
        return []

    def close(self) -> None:
        """Nothing to release; further reads return None."""
        self._next = len(self._ticks)


class CompactTicks:
    """A recording's ticks as arrays, rebuilt into :class:`Tick` objects one at a time.

    Values are kept as recorded (float64, so exactly); a field a GPU did not report at a tick
    is NaN here and absent again from the rebuilt sample (the parser never keeps a NaN
    reading: it is a glitch, i.e. missing).
    """

    def __init__(self, ticks: Sequence[Tick]) -> None:
        slots = sorted({sample.gpu_index for tick in ticks for sample in tick.samples})
        fields = sorted({name for tick in ticks for s in tick.samples for name in s.values})
        slot_of = {index: slot for slot, index in enumerate(slots)}
        field_of = {name: column for column, name in enumerate(fields)}
        self.times = np.array([tick.t_unix_s for tick in ticks], dtype=np.float64)
        self._gpu_indices = tuple(slots)
        self._fields = tuple(fields)
        self._present = np.zeros((len(ticks), len(slots)), dtype=bool)
        self._values = np.full((len(ticks), len(slots), len(fields)), np.nan)
        for row, tick in enumerate(ticks):
            for sample in tick.samples:
                slot = slot_of[sample.gpu_index]
                self._present[row, slot] = True
                for name, value in sample.values.items():
                    self._values[row, slot, field_of[name]] = value

    def __len__(self) -> int:
        return len(self.times)

    def tick(self, row: int, offset_s: float) -> Tick:
        """Tick ``row`` with its time moved by ``offset_s``; samples in GPU index order."""
        samples = tuple(
            GpuSample(index, self._sample_values(row, slot))
            for slot, index in enumerate(self._gpu_indices)
            if self._present[row, slot]
        )
        return Tick(float(self.times[row]) + offset_s, samples)

    def _sample_values(self, row: int, slot: int) -> dict[str, float]:
        readings = self._values[row, slot].tolist()
        return {
            name: value
            for name, value in zip(self._fields, readings, strict=True)
            if not math.isnan(value)
        }


def _recorded_host(recording: Recording, hostname: str, gpu_name: str) -> HostDescription:
    uuids = recording.gpu_uuids
    gpus = tuple(
        GpuDescription(
            index=index,
            uuid=_replay_uuid(uuids, position, index),
            name=gpu_name,
            memory_total_mib=_recorded_memory_total(recording, index),
        )
        for position, index in enumerate(recording.gpu_indices)
    )
    return HostDescription(hostname=hostname, gpus=gpus)


def _replay_uuid(uuids: Sequence[str], position: int, index: int) -> str:
    """The recorded uuid, else a name that cannot be mistaken for a real GPU's."""
    recorded = uuids[position] if position < len(uuids) else ""
    return recorded or f"replay-gpu-{index}"


def _recorded_memory_total(recording: Recording, index: int) -> int:
    if "mem_total_mib" not in recording.fields:
        return 0
    for tick in recording.ticks:
        for sample in tick.samples:
            if sample.gpu_index == index and "mem_total_mib" in sample.values:
                return int(sample.values["mem_total_mib"])
    return 0
