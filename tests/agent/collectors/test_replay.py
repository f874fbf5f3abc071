"""Tests for the nvidia-smi / canonical trace parser and the replay collector.

Every CSV here is a tiny, clearly synthetic snippet written into ``tmp_path`` by the test
itself, in the shapes real nvidia-smi logs take. Real recordings are only read in place from
``<repo>/../shared/data`` and the tests that need them skip when it is absent.
"""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collectors.replay import (
    _FIELD_RULES,
    CANONICAL_MAGIC,
    Glitch,
    Recording,
    RecordingFormatError,
    ReplayCollector,
    infer_slot_count,
    parse_recording,
    write_canonical_trace,
)
from agent.samples import SAMPLE_FIELDS, Collector, GpuSample, Tick

SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
REAL_FOLDERS = ("telemetry/training/", "telemetry/inference/powertrace_sim/")

TRAINING_HEADER = "timestamp, power.draw [W], utilization.gpu [%], memory.used [MiB]\n"
INDEX_HEADER = "timestamp,index,power.draw [W],utilization.gpu [%]\n"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_bytes(text.encode())
    return path


def _values(recording: Recording) -> list[dict[int, dict[str, float]]]:
    return [{s.gpu_index: s.values for s in tick.samples} for tick in recording.ticks]


def _assert_values(recording: Recording, expected: list[dict[int, dict[str, float]]]) -> None:
    """Exact structure (ticks, GPUs, fields); values equal up to unit-conversion rounding."""
    actual = _values(recording)
    assert [{g: sorted(v) for g, v in tick.items()} for tick in actual] == [
        {g: sorted(v) for g, v in tick.items()} for tick in expected
    ]
    for got, want in zip(actual, expected, strict=True):
        for gpu, values in want.items():
            assert got[gpu] == pytest.approx(values, rel=1e-12)


def _relative_times(recording: Recording) -> list[float]:
    first = recording.ticks[0].t_unix_s
    return [round(tick.t_unix_s - first, 6) for tick in recording.ticks]


# ---------------------------------------------------------------------------------------------
# A named table of handwritten snippets: every shape and glitch, with exact expectations.
# ---------------------------------------------------------------------------------------------


BASE_TIME = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _smi_time(milliseconds: int) -> str:
    moment = BASE_TIME + timedelta(milliseconds=milliseconds)
    return moment.strftime("%Y/%m/%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _stalled_ms(tick: int, gpu: int) -> int:
    """Row time of a 3-GPU log whose tick 1 stalls 0.7 s after GPU 0 was read."""
    stalled = tick >= 2 or (tick == 1 and gpu > 0)
    return 100 * tick + gpu + (700 if stalled else 0)


@dataclass(frozen=True)
class Snippet:
    text: str
    gpus: int
    values: list[dict[int, dict[str, float]]]
    times: list[float]
    glitches: dict[str, int] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    uuids: tuple[str, ...] = ()


SNIPPETS = {
    "units_in_values_no_index_jittered": Snippet(
        TRAINING_HEADER + "2025/01/02 03:04:05.100, 71.25 W, 0 %, 130 MiB\n"
        "2025/01/02 03:04:05.102, 72.50 W, 3 %, 17 MiB\n"
        "2025/01/02 03:04:05.200, 80.00 W, 100 %, 41000 MiB\n"
        "2025/01/02 03:04:05.203, 81.00 W, 99 %, 41001 MiB\n",
        gpus=2,
        values=[
            {
                0: {"power_w": 71.25, "util_gpu_pct": 0, "mem_used_mib": 130},
                1: {"power_w": 72.5, "util_gpu_pct": 3, "mem_used_mib": 17},
            },
            {
                0: {"power_w": 80.0, "util_gpu_pct": 100, "mem_used_mib": 41000},
                1: {"power_w": 81.0, "util_gpu_pct": 99, "mem_used_mib": 41001},
            },
        ],
        times=[0.0, 0.1],
    ),
    "nounits_header_units_converted": Snippet(
        "timestamp,index,power.draw [mW],memory.used [GiB],clocks.current.sm [GHz]\n"
        "2025/01/02 03:04:05.000,0,71250,1.5,1.41\n"
        "2025/01/02 03:04:05.250,0,80000,2,1.2\n",
        gpus=1,
        values=[
            {0: {"power_w": 71.25, "mem_used_mib": 1536, "sm_clock_mhz": 1410}},
            {0: {"power_w": 80.0, "mem_used_mib": 2048, "sm_clock_mhz": 1200}},
        ],
        times=[0.0, 0.25],
    ),
    "index_uuid_columns_in_any_order": Snippet(
        "uuid, utilization.gpu [%], name, timestamp, index, clocks.sm [MHz], temperature.gpu\n"
        "GPU-synthetic-a, 10 %, Fake GPU, 2025/01/02 03:04:05.000, 0, 1410 MHz, 40\n"
        "GPU-synthetic-b, 20 %, Fake GPU, 2025/01/02 03:04:05.001, 1, 1395 MHz, 41\n"
        "GPU-synthetic-a, 30 %, Fake GPU, 2025/01/02 03:04:05.250, 0, 1410 MHz, 42\n"
        "GPU-synthetic-b, 40 %, Fake GPU, 2025/01/02 03:04:05.251, 1, 1380 MHz, 43\n",
        gpus=2,
        values=[
            {
                0: {"util_gpu_pct": 10, "sm_clock_mhz": 1410, "temperature_c": 40},
                1: {"util_gpu_pct": 20, "sm_clock_mhz": 1395, "temperature_c": 41},
            },
            {
                0: {"util_gpu_pct": 30, "sm_clock_mhz": 1410, "temperature_c": 42},
                1: {"util_gpu_pct": 40, "sm_clock_mhz": 1380, "temperature_c": 43},
            },
        ],
        times=[0.0, 0.25],
        ignored=("name",),
        uuids=("GPU-synthetic-a", "GPU-synthetic-b"),
    ),
    "uuid_without_index_numbered_by_appearance": Snippet(
        "timestamp,uuid,power.draw [W]\n"
        "2025/01/02 03:04:05.000,GPU-synthetic-z,100\n"
        "2025/01/02 03:04:05.000,GPU-synthetic-y,200\n"
        "2025/01/02 03:04:06.000,GPU-synthetic-z,110\n"
        "2025/01/02 03:04:06.000,GPU-synthetic-y,210\n",
        gpus=2,
        values=[
            {0: {"power_w": 100}, 1: {"power_w": 200}},
            {0: {"power_w": 110}, 1: {"power_w": 210}},
        ],
        times=[0.0, 1.0],
        uuids=("GPU-synthetic-z", "GPU-synthetic-y"),
    ),
    "value_units_beat_header_units": Snippet(
        "timestamp,index,power.draw [W],power.draw.instant [W],memory.used [MiB],"
        "total_energy_consumption [J],clocks_event_reasons.active\n"
        "2025/01/02 03:04:05.000,0,71250 mW,70 W,2 GiB,12.5,0x0000000000000004\n"
        "2025/01/02 03:04:06.000,0,0.08 kW,75 W,512 KiB,13,0x0\n",
        gpus=1,
        values=[
            {
                0: {
                    "power_w": 70,
                    "mem_used_mib": 2048,
                    "energy_mj": 12500,
                    "throttle_reasons": 4,
                }
            },
            {0: {"power_w": 75, "mem_used_mib": 0.5, "energy_mj": 13000, "throttle_reasons": 0}},
        ],
        times=[0.0, 1.0],
        ignored=("power.draw [W]",),  # power.draw.instant wins power_w
    ),
    "missing_markers_and_empty_cells": Snippet(
        "timestamp,index,power.draw [W],utilization.gpu [%],memory.used [MiB],clocks.sm [MHz]\n"
        "2025/01/02 03:04:05.000,0,[N/A],[Not Supported],[Unknown Error],\n"
        "2025/01/02 03:04:06.000,0,N/A,5 %,[GPU is lost],abc\n",
        gpus=1,
        values=[{0: {}}, {0: {"util_gpu_pct": 5}}],
        times=[0.0, 1.0],
        glitches={
            "not_available": 2,
            "not_supported": 1,
            "unknown_error": 2,
            "empty": 1,
            "unparseable": 1,
        },
    ),
    "impossible_values_become_missing": Snippet(
        "timestamp,index,power.draw [W],utilization.gpu [%],memory.used [MiB],temperature.gpu\n"
        "2025/01/02 03:04:05.000,0,-5,1234567,2 TiB,40\n"
        "2025/01/02 03:04:06.000,0,2500,101,100,nan\n"
        "2025/01/02 03:04:07.000,0,300,100,1048576,-1\n",
        gpus=1,
        values=[
            {0: {"temperature_c": 40}},
            {0: {"mem_used_mib": 100}},
            {
                0: {
                    "power_w": 300,
                    "util_gpu_pct": 100,
                    "mem_used_mib": 1048576,
                    "temperature_c": -1,
                }
            },
        ],
        times=[0.0, 1.0, 2.0],
        glitches={"out_of_range": 6},
    ),
    "truncated_last_line_dropped": Snippet(
        TRAINING_HEADER + "2025/01/02 03:04:05.000, 71.25 W, 0 %, 130 MiB\n"
        "2025/01/02 03:04:05.250, 72.00 W, 1 %, 131 MiB\n"
        "2025/01/02 03:04:05.500, 73.00 W, 2 %, 13",
        gpus=1,
        values=[
            {0: {"power_w": 71.25, "util_gpu_pct": 0, "mem_used_mib": 130}},
            {0: {"power_w": 72.0, "util_gpu_pct": 1, "mem_used_mib": 131}},
        ],
        times=[0.0, 0.25],
        glitches={"truncated_line": 1},
    ),
    "last_line_cut_before_all_cells": Snippet(
        INDEX_HEADER
        + "2025/01/02 03:04:05.000,0,100,50\n2025/01/02 03:04:06.000,0,110,55\n2025/01/0",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
        glitches={"truncated_line": 1},
    ),
    "complete_last_line_without_newline_kept": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n2025/01/02 03:04:06.000,0,110,55",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
    ),
    "non_monotonic_row_dropped": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n"
        "2025/01/02 03:04:06.000,0,110,55\n"
        "2025/01/02 03:04:05.500,0,999,99\n"
        "2025/01/02 03:04:07.000,0,120,60\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
            {0: {"power_w": 120, "util_gpu_pct": 60}},
        ],
        times=[0.0, 1.0, 2.0],
        glitches={"non_monotonic": 1},
    ),
    "logger_stall_is_a_gap_not_filled": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n"
        "2025/01/02 03:04:05.250,0,101,51\n"
        "2025/01/02 03:04:05.500,0,102,52\n"
        "2025/01/02 03:04:15.500,0,103,53\n"
        "2025/01/02 03:04:15.750,0,104,54\n",
        gpus=1,
        values=[{0: {"power_w": 100 + i, "util_gpu_pct": 50 + i}} for i in range(5)],
        times=[0.0, 0.25, 0.5, 10.5, 10.75],
        glitches={"stall": 1},
    ),
    "iso_timestamps": Snippet(
        INDEX_HEADER + "2025-01-02T03:04:05.000Z,0,100,50\n"
        "2025-01-02T03:04:05.500+00:00,0,110,55\n"
        "2025-01-02 03:04:06,0,120,60\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
            {0: {"power_w": 120, "util_gpu_pct": 60}},
        ],
        times=[0.0, 0.5, 1.0],
    ),
    "bad_timestamp_and_bad_index_rows_dropped": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n"
        "yesterday noon,0,999,99\n"
        "2025/01/02 03:04:05.500,x,999,99\n"
        "2025/01/02 03:04:06.000,0,110,55\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
        glitches={"bad_timestamp": 1, "bad_gpu_id": 1},
    ),
    "malformed_row_dropped": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n"
        "2025/01/02 03:04:05.500,0,999\n"
        "2025/01/02 03:04:06.000,0,110,55\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
        glitches={"malformed_row": 1},
    ),
    "repeated_header_from_appending_logger": Snippet(
        INDEX_HEADER
        + "2025/01/02 03:04:05.000,0,100,50\n"
        + INDEX_HEADER
        + "2025/01/02 03:04:06.000,0,110,55\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
        glitches={"repeated_header": 1},
    ),
    "changed_header_ends_the_recording": Snippet(
        INDEX_HEADER + "2025/01/02 03:04:05.000,0,100,50\n"
        "timestamp,index,power.draw [W]\n"
        "2025/01/02 03:04:06.000,0,110\n",
        gpus=1,
        values=[{0: {"power_w": 100, "util_gpu_pct": 50}}],
        times=[0.0],
        glitches={"changed_header": 1},
    ),
    "windows_line_ends_bom_and_blank_lines": Snippet(
        "\ufeff" + INDEX_HEADER.replace("\n", "\r\n") + "2025/01/02 03:04:05.000,0,100,50\r\n"
        "\r\n"
        "2025/01/02 03:04:06.000,0,110,55\r\n",
        gpus=1,
        values=[
            {0: {"power_w": 100, "util_gpu_pct": 50}},
            {0: {"power_w": 110, "util_gpu_pct": 55}},
        ],
        times=[0.0, 1.0],
    ),
    "lost_rows_without_index_resynchronise": Snippet(
        # Tick 2 lost GPU 1's row: GPU order must not stay shifted afterwards.
        TRAINING_HEADER + "2025/01/02 03:04:05.000, 100 W, 10 %, 1 MiB\n"
        "2025/01/02 03:04:05.001, 200 W, 20 %, 2 MiB\n"
        "2025/01/02 03:04:05.100, 101 W, 11 %, 1 MiB\n"
        "2025/01/02 03:04:05.200, 102 W, 12 %, 1 MiB\n"
        "2025/01/02 03:04:05.201, 202 W, 22 %, 2 MiB\n"
        "2025/01/02 03:04:05.300, 103 W, 13 %, 1 MiB\n"
        "2025/01/02 03:04:05.301, 203 W, 23 %, 2 MiB\n",
        gpus=2,
        values=[
            {
                0: {"power_w": 100, "util_gpu_pct": 10, "mem_used_mib": 1},
                1: {"power_w": 200, "util_gpu_pct": 20, "mem_used_mib": 2},
            },
            {0: {"power_w": 101, "util_gpu_pct": 11, "mem_used_mib": 1}},
            {
                0: {"power_w": 102, "util_gpu_pct": 12, "mem_used_mib": 1},
                1: {"power_w": 202, "util_gpu_pct": 22, "mem_used_mib": 2},
            },
            {
                0: {"power_w": 103, "util_gpu_pct": 13, "mem_used_mib": 1},
                1: {"power_w": 203, "util_gpu_pct": 23, "mem_used_mib": 2},
            },
        ],
        times=[0.0, 0.1, 0.2, 0.3],
    ),
    "stall_inside_a_tick_without_index": Snippet(
        # Tick 1: GPU 0 read, then a 0.7 s stall before GPUs 1 and 2 of the same tick; the
        # logger carries on from there.
        "timestamp, power.draw [W]\n"
        + "".join(
            f"{_smi_time(_stalled_ms(k, g))}, {100 * (g + 1) + k} W\n"
            for k in range(10)
            for g in range(3)
        ),
        gpus=3,
        values=[{g: {"power_w": 100 * (g + 1) + k} for g in range(3)} for k in range(10)],
        times=[0.0, 0.1] + [0.1 * k + 0.7 for k in range(2, 10)],
        glitches={"stall": 1},  # the 0.8 s between ticks 1 and 2
    ),
    "next_tick_sharing_the_previous_timestamp_text": Snippet(
        "timestamp, power.draw [W]\n"
        "2025/01/02 03:04:05.000, 100 W\n2025/01/02 03:04:05.000, 200 W\n"
        "2025/01/02 03:04:05.100, 101 W\n2025/01/02 03:04:05.100, 201 W\n"
        "2025/01/02 03:04:05.100, 102 W\n2025/01/02 03:04:05.101, 202 W\n"
        "2025/01/02 03:04:05.300, 103 W\n2025/01/02 03:04:05.300, 203 W\n"
        "2025/01/02 03:04:05.400, 104 W\n2025/01/02 03:04:05.400, 204 W\n",
        gpus=2,
        values=[{0: {"power_w": 100 + k}, 1: {"power_w": 200 + k}} for k in range(5)],
        times=[0.0, 0.1, 0.101, 0.3, 0.4],
    ),
    "dropped_rows_without_index_keep_their_gpu_place": Snippet(
        # GPU 0's row of tick 1 has a garbled time, GPU 1's row of tick 2 goes back in time:
        # both are dropped, and every other row stays with its own GPU.
        "timestamp, power.draw [W]\n"
        "2025/01/02 03:04:05.000, 100 W\n2025/01/02 03:04:05.001, 200 W\n"
        "2025/01/02 03:0#:05.100, 101 W\n2025/01/02 03:04:05.101, 201 W\n"
        "2025/01/02 03:04:05.200, 102 W\n2025/01/02 03:04:04.000, 202 W\n"
        "2025/01/02 03:04:05.300, 103 W\n2025/01/02 03:04:05.301, 203 W\n",
        gpus=2,
        values=[
            {0: {"power_w": 100}, 1: {"power_w": 200}},
            {1: {"power_w": 201}},
            {0: {"power_w": 102}},
            {0: {"power_w": 103}, 1: {"power_w": 203}},
        ],
        times=[0.0, 0.101, 0.2, 0.3],
        glitches={"bad_timestamp": 1, "non_monotonic": 1},
    ),
    "single_gpu_without_index": Snippet(
        "timestamp, utilization.gpu [%]\n"
        + "".join(
            f"2025/01/02 03:04:{5 + k // 4:02d}.{250 * (k % 4) + k % 3:03d}, {k} %\n"
            for k in range(8)
        ),
        gpus=1,
        values=[{0: {"util_gpu_pct": k}} for k in range(8)],
        times=[round(0.25 * k + (k % 3) / 1000, 6) for k in range(8)],
    ),
    "one_tick_sharing_a_timestamp": Snippet(
        "timestamp, power.draw [W]\n"
        "2025/01/02 03:04:05.000, 100 W\n2025/01/02 03:04:05.000, 200 W\n"
        "2025/01/02 03:04:05.000, 300 W\n",
        gpus=3,
        values=[{0: {"power_w": 100}, 1: {"power_w": 200}, 2: {"power_w": 300}}],
        times=[0.0],
    ),
}


@pytest.mark.parametrize("snippet", SNIPPETS.values(), ids=SNIPPETS.keys())
def test_snippet_parses_to_exact_values(tmp_path: Path, snippet: Snippet) -> None:
    recording = parse_recording(_write(tmp_path, "log.csv", snippet.text))
    assert recording.gpu_count == snippet.gpus
    _assert_values(recording, snippet.values)
    assert _relative_times(recording) == pytest.approx(snippet.times, abs=1e-6)
    assert dict(recording.glitches) == snippet.glitches
    assert recording.ignored_columns == snippet.ignored
    assert recording.gpu_uuids == snippet.uuids
    assert not recording.is_synthetic


def test_units_in_header_and_values_give_the_same_readings(tmp_path: Path) -> None:
    in_values = TRAINING_HEADER + "2025/01/02 03:04:05.000, 71.25 W, 7 %, 130 MiB\n"
    in_header = (
        "timestamp,power.draw [W],utilization.gpu [%],memory.used [MiB]\n"
        "2025/01/02 03:04:05.000,71.25,7,130\n"
    )
    first = parse_recording(_write(tmp_path, "a.csv", in_values))
    second = parse_recording(_write(tmp_path, "b.csv", in_header))
    assert first.ticks == second.ticks
    assert first.fields == ("power_w", "util_gpu_pct", "mem_used_mib")


def test_recording_holds_source_and_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, "log.csv", SNIPPETS["index_uuid_columns_in_any_order"].text)
    recording = parse_recording(path)
    assert recording.path == path
    assert recording.source == str(path)
    assert recording.fields == ("util_gpu_pct", "sm_clock_mhz", "temperature_c")
    assert recording.gpu_indices == (0, 1)
    assert recording.interval_s == pytest.approx(0.25)
    assert recording.duration_s == pytest.approx(0.25)


BAD_FILES = {
    "empty_file": "",
    "only_blank_lines": "\n\n  \n",
    "no_timestamp_column": "index,power.draw [W]\n0,100\n",
    "comment_without_header": "# just a note\n",
    "unknown_trace_version": "# gpuattest-trace v2 source=x synthetic=false\nt_s,gpu\n1,0\n",
}


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unreadable_files_raise_format_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(RecordingFormatError):
        parse_recording(_write(tmp_path, "bad.csv", text))


def test_field_rules_cover_every_canonical_field() -> None:
    assert set(_FIELD_RULES) == set(SAMPLE_FIELDS)


# ---------------------------------------------------------------------------------------------
# Compression is detected by content, not by name
# ---------------------------------------------------------------------------------------------

GZIP_TEXT = SNIPPETS["units_in_values_no_index_jittered"].text


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("plain.csv", False),
        ("gzip-without-suffix.csv", True),
        ("plain-named.csv.gz", False),
        ("real.csv.gz", True),
    ],
    ids=["plain", "gzip_without_gz_suffix", "plain_with_gz_suffix", "gzip_with_suffix"],
)
def test_gzip_is_detected_by_magic_bytes(tmp_path: Path, name: str, compress: bool) -> None:
    data = gzip.compress(GZIP_TEXT.encode()) if compress else GZIP_TEXT.encode()
    (tmp_path / name).write_bytes(data)
    recording = parse_recording(tmp_path / name)
    assert _values(recording) == SNIPPETS["units_in_values_no_index_jittered"].values


def test_concatenated_gzip_members_are_all_read(tmp_path: Path) -> None:
    head, tail = GZIP_TEXT.split("2025/01/02 03:04:05.200", 1)
    data = gzip.compress(head.encode()) + gzip.compress(("2025/01/02 03:04:05.200" + tail).encode())
    (tmp_path / "two-members.gz").write_bytes(data)
    assert len(parse_recording(tmp_path / "two-members.gz").ticks) == 2


def test_truncated_gzip_stream_keeps_what_decoded(tmp_path: Path) -> None:
    rows = "".join(
        f"2025/01/02 03:04:{k // 10:02d}.{100 * (k % 10):03d},0,{k},{k % 100}\n" for k in range(400)
    )
    data = gzip.compress((INDEX_HEADER + rows).encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) * 2 // 3])
    recording = parse_recording(tmp_path / "cut.csv.gz")
    assert recording.glitches[Glitch.TRUNCATED_STREAM] == 1
    assert 0 < len(recording.ticks) < 400
    powers = [tick.samples[0].values["power_w"] for tick in recording.ticks]
    assert powers == list(range(len(powers)))  # a prefix, in order, nothing invented


def test_nul_bytes_are_removed_and_counted(tmp_path: Path) -> None:
    text = (
        INDEX_HEADER
        + "2025/01/02 03:04:05.000,0,100,50\n\x00\x00\x002025/01/02 03:04:06.000,0,110,55\n"
    )
    recording = parse_recording(_write(tmp_path, "nul.csv", text))
    assert recording.glitches == {"nul_bytes": 1}
    assert len(recording.ticks) == 2


# ---------------------------------------------------------------------------------------------
# Tick grouping without an index: jittered timestamps, inferred GPU count
# ---------------------------------------------------------------------------------------------


@st.composite
def _indexless_logs(draw: st.DrawFn) -> tuple[str, int, int]:
    """An nvidia-smi log without index: n GPUs, jittered tick starts, ms-spread rows."""
    gpus = draw(st.integers(1, 8))
    ticks = draw(st.integers(2, 25))
    interval_ms = draw(st.integers(50, 2000))
    lines = [TRAINING_HEADER]
    for tick in range(ticks):
        start = tick * interval_ms + draw(st.integers(0, interval_ms // 10))
        # nvidia-smi reads the GPUs of a tick milliseconds apart (or stamps them alike).
        step = draw(st.integers(0, min(15, interval_ms // (4 * gpus))))
        for gpu in range(gpus):
            stamp = _smi_time(start + gpu * step)
            lines.append(f"{stamp}, {50 + gpu} W, {tick % 101} %, {tick * 16 + gpu} MiB\n")
    return "".join(lines), gpus, ticks


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(log=_indexless_logs())
def test_indexless_rows_group_into_ticks_in_gpu_order(
    tmp_path: Path, log: tuple[str, int, int]
) -> None:
    text, gpus, ticks = log
    recording = parse_recording(_write(tmp_path, "jitter.csv", text))
    assert recording.gpu_count == gpus
    assert len(recording.ticks) == ticks
    for number, tick in enumerate(recording.ticks):
        assert [s.gpu_index for s in tick.samples] == list(range(gpus))
        assert [s.values["mem_used_mib"] for s in tick.samples] == [
            number * 16 + g for g in range(gpus)
        ]


INFERENCE_CASES = {
    # (row times in seconds, expected GPU count)
    "eight_gpus_rows_1ms_apart": ([k + 0.001 * g for k in range(6) for g in range(8)], 8),
    "eight_gpus_identical_stamps": ([0.1 * k for k in range(6) for _ in range(8)], 8),
    "one_gpu_with_a_stall": (
        [0.25 * k for k in range(20)] + [30.0 + 0.25 * k for k in range(5)],
        1,
    ),
    "two_gpus_rows_10ms_apart": ([k + 0.01 * g for k in range(10) for g in range(2)], 2),
    "one_gpu_rare_long_stalls": (
        [0.1 * k + 60.0 * (k // 200) for k in range(1000)],
        1,
    ),
    "sixteen_gpus_rows_1ms_apart": ([0.5 * k + 0.001 * g for k in range(5) for g in range(16)], 16),
    "single_tick_rows_within_20ms": ([0.0, 0.002, 0.004, 0.006], 4),
    "single_row": ([5.0], 1),
}


@pytest.mark.parametrize(
    ("times", "expected"), INFERENCE_CASES.values(), ids=INFERENCE_CASES.keys()
)
def test_slot_count_inference(times: list[float], expected: int) -> None:
    count, _ = infer_slot_count(np.array(times))
    assert count == expected


def test_inferred_interval_is_the_tick_period() -> None:
    times = np.array([0.1 * k + 0.002 * g for k in range(50) for g in range(8)])
    count, interval = infer_slot_count(times)
    assert count == 8
    assert interval == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Real recordings (read in place, never copied)
# ---------------------------------------------------------------------------------------------


def _labelled_real_files() -> list[dict[str, str]]:
    labels = SHARED_DATA / "telemetry" / "LABELS.csv"
    if not labels.is_file():
        return []
    with labels.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["file"].startswith(REAL_FOLDERS)]


REAL_FILES = _labelled_real_files()


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "label",
    REAL_FILES or [pytest.param({}, marks=pytest.mark.skip(reason="../shared/data absent"))],
    ids=[row["file"].split("telemetry/")[-1] for row in REAL_FILES] or ["absent"],
)
def test_real_recording_parses_consistently_with_labels(label: dict[str, str]) -> None:
    path = SHARED_DATA / label["file"]
    if not path.is_file():
        pytest.skip(f"{path} absent")
    recording = parse_recording(path)
    times = np.array([tick.t_unix_s for tick in recording.ticks])
    assert recording.gpu_count == int(label["gpus"])
    assert len(recording.ticks) > 10
    assert np.all(np.diff(times) > 0)
    assert recording.interval_s == pytest.approx(float(label["interval_s"]), rel=0.1)
    complete = sum(len(tick.samples) == recording.gpu_count for tick in recording.ticks)
    assert complete >= 0.99 * len(recording.ticks)
    assert {"power_w", "util_gpu_pct", "mem_used_mib"} <= set(recording.fields)
    assert not recording.is_synthetic


# ---------------------------------------------------------------------------------------------
# Canonical trace format
# ---------------------------------------------------------------------------------------------


def _field_values(name: str) -> st.SearchStrategy[float]:
    rule = _FIELD_RULES[name]
    return st.floats(rule.low, rule.high, allow_nan=False, allow_infinity=False)


_SAMPLE_VALUES = st.fixed_dictionaries(
    {}, optional={name: _field_values(name) for name in SAMPLE_FIELDS}
)


@st.composite
def _tick_lists(draw: st.DrawFn) -> list[Tick]:
    """Ticks at strictly increasing times, each with 1-4 distinct GPUs and any readings."""
    times = [draw(st.floats(0.0, 2e9, allow_nan=False))]
    for gap in draw(st.lists(st.floats(1e-3, 100.0, allow_nan=False), max_size=8)):
        times.append(times[-1] + gap)
    ticks = []
    for time in times:
        gpus = draw(st.sets(st.integers(0, 7), min_size=1, max_size=4))
        samples = tuple(GpuSample(gpu, draw(_SAMPLE_VALUES)) for gpu in sorted(gpus))
        ticks.append(Tick(time, samples))
    return ticks


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ticks=_tick_lists(),
    source=st.text(max_size=40),
    synthetic=st.booleans(),
    compressed=st.booleans(),
)
def test_canonical_trace_round_trips(
    tmp_path: Path, ticks: list[Tick], source: str, synthetic: bool, compressed: bool
) -> None:
    path = tmp_path / ("trace.csv.gz" if compressed else "trace.csv")
    write_canonical_trace(
        path, ticks, source=source, synthetic=synthetic, metadata={"run": "a b=c"}
    )
    recording = parse_recording(path)
    assert list(recording.ticks) == ticks
    assert recording.source == source
    assert recording.is_synthetic is synthetic
    assert recording.metadata["run"] == "a b=c"
    assert set(recording.glitches) <= {"stall"}  # irregular tick gaps are counted, not changed
    assert recording.gpu_indices == tuple(sorted({s.gpu_index for t in ticks for s in t.samples}))


def test_canonical_trace_layout(tmp_path: Path) -> None:
    ticks = [
        Tick(
            10.0,
            (
                GpuSample(0, {"util_gpu_pct": 97.0, "power_w": 312.5}),
                GpuSample(1, {"util_gpu_pct": 98.0}),
            ),
        ),
        Tick(10.5, (GpuSample(0, {"power_w": math.nan}),)),
    ]
    path = write_canonical_trace(
        tmp_path / "t.csv", ticks, source="run 42", synthetic=False, gpu_uuids=("GPU-a", "GPU-b")
    )
    assert path.read_text().splitlines() == [
        f"{CANONICAL_MAGIC} source=run%2042 synthetic=false gpu_uuids=GPU-a%2CGPU-b",
        "t_s,gpu,power_w,util_gpu_pct",
        "10.0,0,312.5,97",
        "10.0,1,,98",
        "10.5,0,,",
    ]
    recording = parse_recording(path)
    assert recording.gpu_uuids == ("GPU-a", "GPU-b")
    assert _values(recording) == [
        {0: {"power_w": 312.5, "util_gpu_pct": 97}, 1: {"util_gpu_pct": 98}},
        {0: {}},
    ]


def test_gzip_trace_bytes_are_deterministic(tmp_path: Path) -> None:
    ticks = [Tick(1.0, (GpuSample(0, {"power_w": 100.0}),))]
    first = write_canonical_trace(tmp_path / "a.csv.gz", ticks, "x", synthetic=True).read_bytes()
    second = write_canonical_trace(tmp_path / "b.csv.gz", ticks, "x", synthetic=True).read_bytes()
    assert first == second
    assert first.startswith(b"\x1f\x8b")


WRITE_ERRORS = {
    "unknown_field": ({"watts": 1.0}, {}),
    "reserved_metadata_key": ({"power_w": 1.0}, {"source": "x"}),
    "metadata_key_with_space": ({"power_w": 1.0}, {"my key": "x"}),
    "metadata_key_upper_case": ({"power_w": 1.0}, {"Run": "x"}),
}


@pytest.mark.parametrize(("values", "metadata"), WRITE_ERRORS.values(), ids=WRITE_ERRORS.keys())
def test_writer_rejects_invalid_input(
    tmp_path: Path, values: dict[str, float], metadata: dict[str, str]
) -> None:
    ticks = [Tick(1.0, (GpuSample(0, values),))]
    with pytest.raises(ValueError, match=r"not canonical|metadata"):
        write_canonical_trace(tmp_path / "t.csv", ticks, "x", synthetic=False, metadata=metadata)
    assert not (tmp_path / "t.csv").exists()


def test_canonical_reader_drops_duplicate_gpu_rows_and_impossible_values(tmp_path: Path) -> None:
    text = (
        f"{CANONICAL_MAGIC} source=hand synthetic=false\n"
        "t_s,gpu,power_w,util_gpu_pct\n"
        "1.0,0,100,50\n1.0,0,999,99\n1.5,0,110,250\n"
    )
    recording = parse_recording(_write(tmp_path, "t.csv", text))
    assert recording.glitches == {"duplicate_row": 1, "out_of_range": 1}
    assert _values(recording) == [{0: {"power_w": 100, "util_gpu_pct": 50}}, {0: {"power_w": 110}}]


def test_synthetic_file_name_marks_recording_synthetic(tmp_path: Path) -> None:
    ticks = [Tick(1.0, (GpuSample(0, {"power_w": 100.0}),))]
    path = write_canonical_trace(
        tmp_path / "synthetic-x.csv", ticks, "claims real", synthetic=False
    )
    assert parse_recording(path).is_synthetic


# ---------------------------------------------------------------------------------------------
# ReplayCollector
# ---------------------------------------------------------------------------------------------

CREATED_AT = 1_800_000_000.0


class FakeClock:
    """A clock that returns what the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def _recording(
    times: list[float], synthetic: bool = False, uuids: tuple[str, ...] = (), gpus: int = 2
) -> Recording:
    ticks = tuple(
        Tick(
            t,
            tuple(
                GpuSample(g, {"power_w": 100.0 + g, "mem_total_mib": 81920.0}) for g in range(gpus)
            ),
        )
        for t in times
    )
    return Recording(
        source="test",
        path=None,
        ticks=ticks,
        gpu_count=gpus,
        gpu_indices=tuple(range(gpus)),
        gpu_uuids=uuids,
        fields=("power_w", "mem_total_mib"),
        ignored_columns=(),
        glitches={},
        is_synthetic=synthetic,
        interval_s=0.5,
    )


RECORDED_TIMES = [500.0, 500.5, 501.0, 503.0]


def _drain(collector: Collector) -> list[Tick]:
    ticks = []
    while (tick := collector.read_tick()) is not None:
        ticks.append(tick)
    return ticks


def test_speed_one_maps_first_tick_to_creation_time() -> None:
    clock = FakeClock(CREATED_AT)
    collector = ReplayCollector(_recording(RECORDED_TIMES), clock, speed=1.0, hostname="h")
    clock.now += 1000.0  # reading later must not move the mapping
    times = [tick.t_unix_s for tick in _drain(collector)]
    assert times == [CREATED_AT + t - RECORDED_TIMES[0] for t in RECORDED_TIMES]


def test_speed_100_maps_last_tick_to_creation_time_keeping_recorded_spacing() -> None:
    collector = ReplayCollector(_recording(RECORDED_TIMES), FakeClock(CREATED_AT), speed=100.0)
    ticks = _drain(collector)
    times = [tick.t_unix_s for tick in ticks]
    assert times == [CREATED_AT - (RECORDED_TIMES[-1] - t) for t in RECORDED_TIMES]
    assert max(times) <= CREATED_AT  # nothing from the future
    assert collector.pace_delay(ticks[2], ticks[3]) == pytest.approx(2.0 / 100.0)


PACE_CASES = {
    "real_time": (1.0, 2.0),
    "half_speed": (0.5, 4.0),
    "ten_times": (10.0, 0.2),
    "zero_means_as_fast_as_possible": (0.0, 0.0),
    "infinite": (math.inf, 0.0),
}


@pytest.mark.parametrize(("speed", "delay"), PACE_CASES.values(), ids=PACE_CASES.keys())
def test_pace_delay_is_recorded_gap_over_speed(speed: float, delay: float) -> None:
    collector = ReplayCollector(_recording(RECORDED_TIMES), FakeClock(0.0), speed=speed)
    ticks = _drain(collector)
    assert collector.pace_delay(ticks[2], ticks[3]) == pytest.approx(delay)
    assert collector.pace_delay(None, ticks[0]) == 0.0


@pytest.mark.parametrize("speed", [-1.0, math.nan], ids=["negative", "nan"])
def test_invalid_speed_is_rejected(speed: float) -> None:
    with pytest.raises(ValueError, match="speed"):
        ReplayCollector(_recording(RECORDED_TIMES), FakeClock(0.0), speed=speed)


def test_replay_keeps_samples_and_ends_with_none() -> None:
    recording = _recording(RECORDED_TIMES)
    collector: Collector = ReplayCollector(recording, FakeClock(CREATED_AT))
    ticks = _drain(collector)
    assert [tick.samples for tick in ticks] == [tick.samples for tick in recording.ticks]
    assert collector.read_tick() is None
    assert collector.processes() == []


def test_close_ends_the_replay() -> None:
    collector = ReplayCollector(_recording(RECORDED_TIMES), FakeClock(0.0))
    assert collector.read_tick() is not None
    collector.close()
    assert collector.read_tick() is None


def test_empty_recording_replays_nothing() -> None:
    collector = ReplayCollector(_recording([]), FakeClock(0.0), speed=100.0)
    assert collector.read_tick() is None


@pytest.mark.parametrize(
    ("synthetic", "source"),
    [(False, "replay"), (True, "synthetic-replay")],
    ids=["real", "synthetic"],
)
def test_source_says_whether_the_recording_is_synthetic(synthetic: bool, source: str) -> None:
    collector = ReplayCollector(_recording(RECORDED_TIMES, synthetic=synthetic), FakeClock(0.0))
    assert collector.source == source


def test_describe_host_uses_recorded_uuids_and_caller_name() -> None:
    recording = _recording(RECORDED_TIMES, uuids=("GPU-synthetic-a", "GPU-synthetic-b"))
    host = ReplayCollector(
        recording, FakeClock(0.0), hostname="node-7", gpu_name="H100"
    ).describe_host()
    assert host.hostname == "node-7"
    assert [(g.index, g.uuid, g.name, g.memory_total_mib) for g in host.gpus] == [
        (0, "GPU-synthetic-a", "H100", 81920),
        (1, "GPU-synthetic-b", "H100", 81920),
    ]


def test_describe_host_without_uuids_names_replay_gpus() -> None:
    host = ReplayCollector(_recording(RECORDED_TIMES, gpus=3), FakeClock(0.0)).describe_host()
    assert [g.uuid for g in host.gpus] == ["replay-gpu-0", "replay-gpu-1", "replay-gpu-2"]
    assert {g.name for g in host.gpus} == {"unknown"}


def test_replay_of_parsed_log_end_to_end(tmp_path: Path) -> None:
    path = _write(tmp_path, "log.csv", SNIPPETS["index_uuid_columns_in_any_order"].text)
    collector = ReplayCollector(parse_recording(path), FakeClock(CREATED_AT), gpu_name="Fake GPU")
    ticks = _drain(collector)
    assert [t.t_unix_s for t in ticks] == pytest.approx([CREATED_AT, CREATED_AT + 0.25])
    assert [g.uuid for g in collector.describe_host().gpus] == [
        "GPU-synthetic-a",
        "GPU-synthetic-b",
    ]
