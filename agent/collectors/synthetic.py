"""Synthetic GPU telemetry: small, seeded traces of training, inference and idle hosts.

They stand in for real recordings in the demo (when ``../shared`` is absent) and in tests. The
physics is simple but points the right way, so features computed from them behave like
features computed from real logs:

* training: steady ~95-100 % utilization, power at a large fraction of TDP with a periodic
  iteration rhythm (0.5-2 s), short gradient-sync dips in lockstep on every GPU, rarer deep
  checkpoint dips, and a flat memory plateau;
* inference: requests arrive in Poisson bursts separated by idle gaps; utilization is bursty,
  power stays far below TDP, and memory sits near-full (pre-allocated KV cache);
* idle: ~0 % utilization at idle power.

Everything is drawn from one ``numpy.random.Generator`` seeded by the caller: same seed, same
trace. Traces written to disk are canonical traces marked ``synthetic=true`` in files named
``synthetic-*`` so they can never pass for a real recording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent.collectors.replay import SYNTHETIC_PREFIX, Recording, write_canonical_trace
from agent.samples import SAMPLE_FIELDS, GpuSample, Tick

TraceKind = Literal["training", "inference", "idle"]
TRACE_KINDS: tuple[TraceKind, ...] = ("training", "inference", "idle")
# A fixed epoch keeps traces byte-identical for a seed; replay rebases it onto the wall clock.
DEFAULT_START_UNIX_S = 1_700_000_000.0
# One default sampling setup for every kind: the interval must never hint at the label.
DEFAULT_GPUS = 4
DEFAULT_SECONDS = 60.0
DEFAULT_INTERVAL_S = 0.1

_Arrays = dict[str, np.ndarray]  # canonical field -> (ticks, gpus) readings


@dataclass(frozen=True)
class GpuModel:
    """The handful of device facts the generators need."""

    name: str
    tdp_w: float
    idle_w: float
    memory_total_mib: float
    max_sm_clock_mhz: float
    idle_sm_clock_mhz: float
    mem_clock_mhz: float


H100_SXM = GpuModel("NVIDIA H100 80GB HBM3", 700.0, 70.0, 81559.0, 1980.0, 345.0, 2619.0)
A100_SXM = GpuModel("NVIDIA A100-SXM4-80GB", 400.0, 55.0, 81920.0, 1410.0, 210.0, 1593.0)


# ---------------------------------------------------------------------------------------------
# Public generators
# ---------------------------------------------------------------------------------------------


def generate_training_trace(
    seed: int,
    gpus: int = DEFAULT_GPUS,
    seconds: float = DEFAULT_SECONDS,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    model: GpuModel = H100_SXM,
    start_unix_s: float = DEFAULT_START_UNIX_S,
) -> Recording:
    """Data-parallel training: iteration rhythm, lockstep sync dips, checkpoint dips."""
    return _generate("training", seed, gpus, seconds, interval_s, model, start_unix_s)


def generate_inference_trace(
    seed: int,
    gpus: int = DEFAULT_GPUS,
    seconds: float = DEFAULT_SECONDS,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    model: GpuModel = H100_SXM,
    start_unix_s: float = DEFAULT_START_UNIX_S,
) -> Recording:
    """LLM serving: Poisson request bursts and idle gaps, power far below TDP."""
    return _generate("inference", seed, gpus, seconds, interval_s, model, start_unix_s)


def generate_idle_trace(
    seed: int,
    gpus: int = DEFAULT_GPUS,
    seconds: float = DEFAULT_SECONDS,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    model: GpuModel = H100_SXM,
    start_unix_s: float = DEFAULT_START_UNIX_S,
) -> Recording:
    """An idle host: ~0 % utilization at idle power, little memory in use."""
    return _generate("idle", seed, gpus, seconds, interval_s, model, start_unix_s)


def generate_trace(
    kind: TraceKind,
    seed: int,
    gpus: int = DEFAULT_GPUS,
    seconds: float = DEFAULT_SECONDS,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    model: GpuModel = H100_SXM,
    start_unix_s: float = DEFAULT_START_UNIX_S,
) -> Recording:
    """The generator for ``kind`` ("training", "inference" or "idle")."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown synthetic trace kind {kind!r}; expected one of {TRACE_KINDS}")
    return _generate(kind, seed, gpus, seconds, interval_s, model, start_unix_s)


def synthetic_file_name(kind: TraceKind, seed: int) -> str:
    """The file name :func:`write_synthetic_trace` uses inside a directory."""
    return f"{SYNTHETIC_PREFIX}{kind}-seed{seed}.csv.gz"


def write_synthetic_trace(
    path: Path,
    kind: TraceKind,
    seed: int,
    gpus: int = DEFAULT_GPUS,
    seconds: float = DEFAULT_SECONDS,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    model: GpuModel = H100_SXM,
) -> Path:
    """Generate a trace and write it as a canonical trace marked ``synthetic=true``.

    ``path`` is a directory (the file is named by :func:`synthetic_file_name`) or a file path
    whose name starts with ``synthetic-``. Returns the path written.
    """
    target = path / synthetic_file_name(kind, seed) if path.is_dir() else path
    if not target.name.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"synthetic trace names must start with {SYNTHETIC_PREFIX!r}: {target}")
    recording = generate_trace(kind, seed, gpus, seconds, interval_s, model=model)
    return write_canonical_trace(
        target,
        recording.ticks,
        source=recording.source,
        synthetic=True,
        metadata=dict(recording.metadata),
    )


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _generate(
    kind: TraceKind,
    seed: int,
    gpus: int,
    seconds: float,
    interval_s: float,
    model: GpuModel,
    start_unix_s: float,
) -> Recording:
    if gpus < 1 or seconds <= 0 or interval_s <= 0:
        raise ValueError("need gpus >= 1, seconds > 0 and interval_s > 0")
    rng = np.random.default_rng(seed)
    times = np.arange(max(1, round(seconds / interval_s))) * interval_s
    arrays = _GENERATORS[kind](rng, times, gpus, model)
    arrays.update(_derived_fields(rng, arrays, interval_s, model))
    ticks = _ticks(start_unix_s + times, _rounded(arrays))
    return Recording(
        source=f"synthetic:{kind}:seed={seed}",
        path=None,
        ticks=ticks,
        gpu_count=gpus,
        gpu_indices=tuple(range(gpus)),
        gpu_uuids=(),
        fields=tuple(name for name in SAMPLE_FIELDS if name in arrays),
        ignored_columns=(),
        glitches={},
        is_synthetic=True,
        interval_s=interval_s,
        metadata={"generator": "gpuattest.synthetic", "kind": kind, "seed": str(seed)},
    )


def _ticks(times: np.ndarray, arrays: _Arrays) -> tuple[Tick, ...]:
    columns = {name: values.tolist() for name, values in arrays.items()}
    gpus = next(iter(arrays.values())).shape[1]
    return tuple(
        Tick(
            float(time),
            tuple(
                GpuSample(gpu, {name: rows[row][gpu] for name, rows in columns.items()})
                for gpu in range(gpus)
            ),
        )
        for row, time in enumerate(times.tolist())
    )


# Decimals per field, as nvidia-smi prints them: integers except power.
_DECIMALS = {"power_w": 2}


def _rounded(arrays: _Arrays) -> _Arrays:
    return {name: np.round(values, _DECIMALS.get(name, 0)) for name, values in arrays.items()}


def _derived_fields(
    rng: np.random.Generator, arrays: _Arrays, interval_s: float, model: GpuModel
) -> _Arrays:
    """Fields that follow from power: cumulative energy, lagging temperature, constants."""
    power = arrays["power_w"]
    ticks, gpus = power.shape
    start_energy_mj = rng.uniform(1e8, 5e9, gpus)
    energy = start_energy_mj + np.cumsum(power * interval_s * 1000.0, axis=0)
    return {
        "energy_mj": np.floor(energy),
        "temperature_c": _temperature(rng, power, interval_s),
        "mem_total_mib": np.full((ticks, gpus), model.memory_total_mib),
        "mem_clock_mhz": np.full((ticks, gpus), model.mem_clock_mhz),
    }


def _temperature(rng: np.random.Generator, power: np.ndarray, interval_s: float) -> np.ndarray:
    """First-order thermal lag (time constant ~60 s) towards 28 C + 0.06 C/W."""
    equilibrium = 28.0 + 0.06 * power
    alpha = 1.0 - np.exp(-interval_s / 60.0)
    temperature = np.empty_like(power)
    current = rng.uniform(30.0, 40.0, power.shape[1])
    for row in range(power.shape[0]):
        current = current + alpha * (equilibrium[row] - current)
        temperature[row] = current
    return temperature


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _iteration_phase(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """Phase (0..1) within the current training iteration; iterations jitter by ~3 %."""
    period = rng.uniform(0.5, 2.0)
    count = int(times[-1] / period * 1.3) + 4
    durations = period * np.clip(1.0 + 0.03 * rng.standard_normal(count), 0.85, 1.15)
    starts = np.concatenate(([-rng.uniform(0.0, period)], np.cumsum(durations)))
    starts[1:] += starts[0]
    index = np.searchsorted(starts, times, side="right") - 1
    return np.asarray((times - starts[index]) / durations[index])


def _checkpoint_mask(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """True during checkpoint writes: every 45-90 s, lasting 1.5-3 s."""
    every = rng.uniform(45.0, 90.0)
    length = rng.uniform(1.5, 3.0)
    first = every * rng.uniform(0.2, 1.0)
    return np.asarray((times >= first) & ((times - first) % every < length))


def _training(rng: np.random.Generator, times: np.ndarray, gpus: int, model: GpuModel) -> _Arrays:
    shape = (times.size, gpus)
    sync = (_iteration_phase(rng, times) >= 1.0 - rng.uniform(0.12, 0.25))[:, None]
    checkpoint = _checkpoint_mask(rng, times)[:, None]
    compute_w = model.tdp_w * rng.uniform(0.70, 0.85)
    sync_w = model.tdp_w * rng.uniform(0.40, 0.55)
    level = np.where(checkpoint, model.idle_w + 40.0, np.where(sync, sync_w, compute_w))
    offsets = rng.normal(0.0, 0.015 * model.tdp_w, gpus)
    power = level + offsets + rng.normal(0.0, 0.015 * model.tdp_w, shape)
    busy_util = 100.0 - np.abs(rng.normal(0.0, 1.5, shape))
    util = np.where(checkpoint, rng.uniform(0.0, 5.0, shape), busy_util)
    util = np.where(sync & ~checkpoint, rng.uniform(90.0, 98.0, shape), util)
    util_mem = np.where(sync, rng.uniform(10.0, 20.0, shape), rng.uniform(35.0, 50.0, shape))
    plateau = model.memory_total_mib * rng.uniform(0.45, 0.85) + rng.uniform(0.0, 600.0, gpus)
    clock_steps = 15.0 * rng.integers(0, 3, shape)
    return {
        "power_w": np.clip(power, 0.9 * model.idle_w, model.tdp_w),
        "util_gpu_pct": np.clip(util, 0.0, 100.0),
        "util_mem_pct": np.where(checkpoint, rng.uniform(0.0, 3.0, shape), util_mem),
        "mem_used_mib": np.broadcast_to(plateau, shape).copy(),
        "sm_clock_mhz": model.max_sm_clock_mhz - clock_steps,
    }


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def _arrivals(rng: np.random.Generator, horizon_s: float) -> np.ndarray:
    """Request arrival times: Poisson within busy phases, none within idle gaps."""
    rate = rng.uniform(0.5, 4.0)
    mean_busy, mean_idle = rng.uniform(4.0, 15.0), rng.uniform(4.0, 15.0)
    clock, busy = 0.0, bool(rng.random() < 0.5)
    chunks: list[np.ndarray] = []
    while clock < horizon_s:
        duration = rng.exponential(mean_busy if busy else mean_idle)
        if busy:
            chunks.append(clock + rng.uniform(0.0, duration, rng.poisson(rate * duration)))
        clock += duration
        busy = not busy
    return np.sort(np.concatenate(chunks)) if chunks else np.empty(0)


def _in_flight(starts: np.ndarray, ends: np.ndarray, times: np.ndarray) -> np.ndarray:
    """How many [start, end) intervals contain each time."""
    begun = np.searchsorted(np.sort(starts), times, side="right")
    finished = np.searchsorted(np.sort(ends), times, side="right")
    return np.asarray(begun - finished)


def _inference(rng: np.random.Generator, times: np.ndarray, gpus: int, model: GpuModel) -> _Arrays:
    shape = (times.size, gpus)
    arrivals = _arrivals(rng, float(times[-1]) + 1.0)
    prefill_end = arrivals + rng.uniform(0.05, 0.3, arrivals.size)
    decode_end = prefill_end + np.clip(rng.lognormal(np.log(2.0), 0.6, arrivals.size), 0.2, 20.0)
    prefilling = (_in_flight(arrivals, prefill_end, times) > 0)[:, None]
    decoding = _in_flight(prefill_end, decode_end, times)[:, None]
    active = prefilling | (decoding > 0)
    load = 1.0 - np.exp(-decoding / 4.0)  # batching: power saturates with concurrency
    power = (
        model.idle_w
        + (0.45 * model.tdp_w - model.idle_w) * load
        + 0.15 * model.tdp_w * prefilling
        + rng.normal(0.0, 0.01 * model.tdp_w, shape)
    )
    util = np.where(active, 30.0 + 55.0 * load + 10.0 * prefilling + rng.normal(0, 4, shape), 0.0)
    plateau = model.memory_total_mib * rng.uniform(0.88, 0.92) + rng.uniform(0.0, 300.0, gpus)
    return {
        "power_w": np.clip(power, 0.9 * model.idle_w, model.tdp_w),
        "util_gpu_pct": np.clip(util, 0.0, 100.0),
        "util_mem_pct": np.where(active, 8.0 + 40.0 * load, 0.0) + np.zeros(shape),
        "mem_used_mib": np.broadcast_to(plateau, shape).copy(),
        "sm_clock_mhz": model.max_sm_clock_mhz - 15.0 * rng.integers(0, 2, shape),
    }


# ---------------------------------------------------------------------------------------------
# Idle
# ---------------------------------------------------------------------------------------------


def _idle(rng: np.random.Generator, times: np.ndarray, gpus: int, model: GpuModel) -> _Arrays:
    shape = (times.size, gpus)
    power = model.idle_w + rng.normal(0.0, 3.0, gpus) + rng.normal(0.0, 0.8, shape)
    blips = rng.random(shape) < 0.01  # monitoring agents touch the GPU now and then
    return {
        "power_w": np.clip(power, 0.5 * model.idle_w, None),
        "util_gpu_pct": np.where(blips, rng.uniform(1.0, 3.0, shape), 0.0),
        "util_mem_pct": np.zeros(shape),
        "mem_used_mib": np.broadcast_to(rng.uniform(0.0, 600.0, gpus), shape).copy(),
        "sm_clock_mhz": np.full(shape, model.idle_sm_clock_mhz),
    }


_GENERATORS: dict[str, Callable[[np.random.Generator, np.ndarray, int, GpuModel], _Arrays]] = {
    "training": _training,
    "inference": _inference,
    "idle": _idle,
}
