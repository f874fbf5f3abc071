"""Tests for the seeded synthetic training / inference / idle traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.collectors.replay import Recording, ReplayCollector, parse_recording
from agent.collectors.synthetic import (
    A100_SXM,
    H100_SXM,
    TRACE_KINDS,
    TraceKind,
    generate_idle_trace,
    generate_inference_trace,
    generate_trace,
    generate_training_trace,
    synthetic_file_name,
    write_synthetic_trace,
)


def _matrix(recording: Recording, name: str) -> np.ndarray:
    """(ticks, gpus) readings of one field."""
    return np.array([[s.values[name] for s in tick.samples] for tick in recording.ticks])


@pytest.fixture(scope="module")
def traces() -> dict[str, list[Recording]]:
    """A few seeds of every kind, generated once for the module."""
    return {kind: [generate_trace(kind, seed) for seed in range(4)] for kind in TRACE_KINDS}


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_same_seed_same_trace_other_seed_other_trace(kind: TraceKind) -> None:
    assert generate_trace(kind, 7).ticks == generate_trace(kind, 7).ticks
    assert generate_trace(kind, 7).ticks != generate_trace(kind, 8).ticks


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_shape_and_marking(kind: TraceKind) -> None:
    recording = generate_trace(kind, 1, gpus=3, seconds=5.0, interval_s=0.25)
    assert recording.is_synthetic
    assert recording.gpu_count == 3
    assert len(recording.ticks) == 20
    assert all([s.gpu_index for s in tick.samples] == [0, 1, 2] for tick in recording.ticks)
    times = np.array([tick.t_unix_s for tick in recording.ticks])
    assert np.diff(times) == pytest.approx(0.25)
    assert {"power_w", "util_gpu_pct", "mem_used_mib", "energy_mj"} <= set(recording.fields)
    assert recording.metadata["kind"] == kind


def test_named_generators_match_the_dispatcher() -> None:
    assert generate_training_trace(3).ticks == generate_trace("training", 3).ticks
    assert generate_inference_trace(3).ticks == generate_trace("inference", 3).ticks
    assert generate_idle_trace(3).ticks == generate_trace("idle", 3).ticks


def test_training_is_busier_and_hotter_than_inference(traces: dict[str, list[Recording]]) -> None:
    for training, inference in zip(traces["training"], traces["inference"], strict=True):
        assert _matrix(training, "util_gpu_pct").mean() > _matrix(inference, "util_gpu_pct").mean()
        assert _matrix(training, "power_w").mean() > _matrix(inference, "power_w").mean()


def test_training_is_steady_high_utilization(traces: dict[str, list[Recording]]) -> None:
    for recording in traces["training"]:
        util = _matrix(recording, "util_gpu_pct")
        assert util.mean() > 90.0
        assert np.median(util) >= 95.0


def test_training_gpus_move_in_lockstep(traces: dict[str, list[Recording]]) -> None:
    for recording in traces["training"]:
        power = _matrix(recording, "power_w")
        correlation = np.corrcoef(power.T)
        assert correlation[np.triu_indices(power.shape[1], 1)].min() > 0.8


def test_training_power_has_an_iteration_rhythm(traces: dict[str, list[Recording]]) -> None:
    """Autocorrelation of node power peaks at a lag of one iteration (0.5-2 s)."""
    for recording in traces["training"]:
        power = _matrix(recording, "power_w").mean(axis=1)
        centred = power - power.mean()
        autocorrelation = np.correlate(centred, centred, "full")[centred.size - 1 :]
        autocorrelation /= autocorrelation[0]
        lags = np.arange(4, 21)  # 0.4-2.0 s at 0.1 s
        assert autocorrelation[lags].max() > 0.3


def test_training_has_deep_checkpoint_dips_and_a_memory_plateau(
    traces: dict[str, list[Recording]],
) -> None:
    for recording in traces["training"]:
        power = _matrix(recording, "power_w")
        assert (power.max(axis=1) < H100_SXM.idle_w + 100.0).any()  # all GPUs down at once
        memory = _matrix(recording, "mem_used_mib")
        assert np.ptp(memory, axis=0).max() == 0.0


def test_inference_is_bursty_far_below_tdp_with_memory_near_full(
    traces: dict[str, list[Recording]],
) -> None:
    for recording in traces["inference"]:
        util = _matrix(recording, "util_gpu_pct")
        assert (util == 0).mean() > 0.05  # idle gaps between bursts
        assert (util > 50).mean() > 0.05  # and bursts
        assert np.percentile(_matrix(recording, "power_w"), 90) < 0.65 * H100_SXM.tdp_w
        memory = _matrix(recording, "mem_used_mib") / _matrix(recording, "mem_total_mib")
        assert memory.min() > 0.85


def test_idle_is_idle(traces: dict[str, list[Recording]]) -> None:
    for recording in traces["idle"]:
        assert _matrix(recording, "util_gpu_pct").mean() < 1.0
        assert _matrix(recording, "power_w").max() < H100_SXM.idle_w + 20.0


def test_energy_is_monotonic_and_matches_power() -> None:
    recording = generate_training_trace(5, gpus=2, seconds=10.0, interval_s=0.1)
    energy = _matrix(recording, "energy_mj")
    power = _matrix(recording, "power_w")
    assert (np.diff(energy, axis=0) > 0).all()
    joules = (energy[-1] - energy[0]) / 1000.0
    assert joules == pytest.approx(power[1:].sum(axis=0) * 0.1, rel=0.01)


def test_gpu_model_sets_the_scale() -> None:
    a100 = generate_training_trace(2, model=A100_SXM)
    assert _matrix(a100, "power_w").max() <= A100_SXM.tdp_w
    assert set(_matrix(a100, "mem_total_mib").ravel()) == {A100_SXM.memory_total_mib}


INVALID_ARGUMENTS = {
    "no_gpus": {"gpus": 0},
    "no_seconds": {"seconds": 0.0},
    "negative_interval": {"interval_s": -0.1},
}


@pytest.mark.parametrize("arguments", INVALID_ARGUMENTS.values(), ids=INVALID_ARGUMENTS.keys())
def test_invalid_arguments_are_rejected(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need gpus"):
        generate_trace("training", 1, **arguments)  # type: ignore[arg-type]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown synthetic trace kind"):
        generate_trace("mining", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", TRACE_KINDS)
def test_written_trace_reads_back_as_synthetic(tmp_path: Path, kind: TraceKind) -> None:
    path = write_synthetic_trace(tmp_path, kind, 11, gpus=2, seconds=5.0)
    assert path.name == synthetic_file_name(kind, 11)
    assert path.name.startswith("synthetic-")
    assert path.read_bytes().startswith(b"\x1f\x8b")
    recording = parse_recording(path)
    assert recording.is_synthetic
    assert recording.glitches == {}  # every generated value is physically plausible
    assert recording.ticks == generate_trace(kind, 11, gpus=2, seconds=5.0).ticks
    assert recording.metadata["seed"] == "11"
    assert ReplayCollector(recording, lambda: 0.0).source == "synthetic-replay"


def test_written_trace_file_name_must_say_synthetic(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synthetic-"):
        write_synthetic_trace(tmp_path / "training.csv", "training", 1)
    assert not (tmp_path / "training.csv").exists()
    named = write_synthetic_trace(tmp_path / "synthetic-mine.csv", "idle", 1, seconds=2.0)
    assert parse_recording(named).is_synthetic
