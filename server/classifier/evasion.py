"""What a tenant could do to a training run's telemetry to pass it off as something else.

Each family transforms the ticks of a real training recording the way the tenant's changed
job would have changed them; the transformed recording is then classified by a model fitted
*without* that recording. The suite reports, per family and strength, how often the run is
still called training. The transformations act on what NVML would read (utilization and
power); they are models of the attacks, not the attacks themselves.

Families (DESIGN.md threat model, REFERENCES.md "de-periodicisation" attacks):

* ``idle_gaps``: the job pauses at random for 2-8 s at a time (a share of the time idle);
* ``power_cap``: the board is capped to a share of TDP (power clipped, the job still runs);
* ``duty_cycle``: the job is throttled on a fixed on/off cycle of 1-4 s;
* ``period_jitter``: iteration timing is randomised (time stretched segment by segment);
* ``inference_bursts``: stretches of request-driven, bursty load are interleaved;
* ``partial_gpus``: only some GPUs of the host train, the rest stay idle.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.collectors.replay import parse_recording
from agent.samples import GpuSample, Tick
from agent.skus import sku_for
from server.classifier.dataset import (
    RecordingData,
    discover,
    first_busy_s,
    gpu_descriptions,
    load_recording_data,
    rebased,
    window_rows,
)
from server.classifier.evaluate import HeldOut, assert_disjoint, classify_held_out
from server.classifier.fit import DEFAULT_SETTINGS, FitSettings, fit_model
from server.classifier.model import StumpModel

Transform = Callable[[Sequence[Tick], np.random.Generator, float, float], list[Tick]]
_DEFAULT_TDP_W = 700.0
_IDLE_TDP_FRAC = 0.1


def _replace(tick: Tick, gpus: set[int] | None, **values: float) -> Tick:
    """The tick with the given fields overwritten on ``gpus`` (all GPUs when None)."""
    return Tick(
        tick.t_unix_s,
        tuple(
            GpuSample(s.gpu_index, {**s.values, **values})
            if gpus is None or s.gpu_index in gpus
            else s
            for s in tick.samples
        ),
    )


def _idle(tick: Tick, tdp_w: float, gpus: set[int] | None = None) -> Tick:
    return _replace(tick, gpus, util_gpu_pct=0.0, power_w=_IDLE_TDP_FRAC * tdp_w)


def _mask_segments(
    times: np.ndarray, rng: np.random.Generator, share: float, low_s: float, high_s: float
) -> np.ndarray:
    """Random segments of low_s-high_s seconds covering about ``share`` of the time."""
    mask = np.zeros(times.size, dtype=bool)
    if times.size == 0 or share <= 0:
        return mask
    clock, end = float(times[0]), float(times[-1])
    mean_length = (low_s + high_s) / 2.0
    mean_gap = mean_length * (1.0 - share) / share
    while clock < end:
        clock += rng.exponential(mean_gap)
        length = rng.uniform(low_s, high_s)
        mask |= (times >= clock) & (times < clock + length)
        clock += length
    return mask


def unchanged(
    ticks: Sequence[Tick], rng: np.random.Generator, strength: float, tdp_w: float
) -> list[Tick]:
    """The recording as it is: the baseline every family is compared with."""
    return list(ticks)


def idle_gaps(
    ticks: Sequence[Tick], rng: np.random.Generator, share: float, tdp_w: float
) -> list[Tick]:
    """Pause the job for random 2-8 s gaps covering ``share`` of the time."""
    times = np.array([tick.t_unix_s for tick in ticks])
    mask = _mask_segments(times, rng, share, 2.0, 8.0)
    return [_idle(tick, tdp_w) if hit else tick for tick, hit in zip(ticks, mask, strict=True)]


def power_cap(
    ticks: Sequence[Tick], rng: np.random.Generator, cap_frac: float, tdp_w: float
) -> list[Tick]:
    """Clip every GPU's power to ``cap_frac`` of TDP (the job keeps running, slower)."""
    cap_w = cap_frac * tdp_w
    return [
        Tick(
            tick.t_unix_s,
            tuple(
                GpuSample(s.gpu_index, {**s.values, "power_w": min(s.values["power_w"], cap_w)})
                if "power_w" in s.values
                else s
                for s in tick.samples
            ),
        )
        for tick in ticks
    ]


def duty_cycle(
    ticks: Sequence[Tick], rng: np.random.Generator, off_share: float, tdp_w: float
) -> list[Tick]:
    """Throttle on a fixed cycle of 1-4 s: idle for ``off_share`` of each cycle."""
    period_s = rng.uniform(1.0, 4.0)
    phase = rng.uniform(0.0, period_s)
    out = []
    for tick in ticks:
        position = ((tick.t_unix_s + phase) % period_s) / period_s
        out.append(_idle(tick, tdp_w) if position < off_share else tick)
    return out


def period_jitter(
    ticks: Sequence[Tick], rng: np.random.Generator, spread: float, tdp_w: float
) -> list[Tick]:
    """Stretch time segment by segment (1-3 s each) by a random factor in 1 +- ``spread``."""
    if not ticks:
        return []
    out = [ticks[0]]
    clock = ticks[0].t_unix_s
    factor, segment_end = 1.0, ticks[0].t_unix_s
    for previous, tick in itertools.pairwise(ticks):
        if tick.t_unix_s >= segment_end:
            factor = rng.uniform(1.0 - spread, 1.0 + spread)
            segment_end = tick.t_unix_s + rng.uniform(1.0, 3.0)
        clock += (tick.t_unix_s - previous.t_unix_s) * factor
        out.append(Tick(clock, tick.samples))
    return out


def inference_bursts(
    ticks: Sequence[Tick], rng: np.random.Generator, share: float, tdp_w: float
) -> list[Tick]:
    """Replace ``share`` of the time with request-driven looking load (1-4 s bursts).

    Each burst holds one load level, as a serving engine's utilization does between
    arrivals (it reads steady within a point or two in real serving logs, see
    ``util_busy_jitter_frac``); one burst in five is a gap between requests.
    """
    times = np.array([tick.t_unix_s for tick in ticks])
    mask = _mask_segments(times, rng, share, 1.0, 4.0)
    # A new segment starts wherever the mask switches on.
    segment = np.cumsum(mask & ~np.concatenate(([False], mask[:-1])))
    levels: dict[int, tuple[float, float]] = {}
    out = []
    for tick, hit, index in zip(ticks, mask, segment, strict=True):
        if not hit:
            out.append(tick)
            continue
        if int(index) not in levels:
            busy = rng.random() < 0.8
            levels[int(index)] = (
                float(rng.uniform(60.0, 97.0)) if busy else 0.0,
                tdp_w * float(rng.uniform(0.3, 0.7) if busy else _IDLE_TDP_FRAC),
            )
        util, power = levels[int(index)]
        if util > 0.0:
            # Whole-percent readings wobble by a point; power follows the batch a little.
            util = min(100.0, util + float(rng.integers(-1, 2)))
            power *= 1.0 + 0.03 * float(rng.standard_normal())
        out.append(_replace(tick, None, util_gpu_pct=util, power_w=power))
    return out


def partial_gpus(
    ticks: Sequence[Tick], rng: np.random.Generator, share: float, tdp_w: float
) -> list[Tick]:
    """Keep training on ``share`` of the GPUs (at least one); the others idle throughout."""
    gpus = sorted({s.gpu_index for tick in ticks[:50] for s in tick.samples})
    keep = max(1, round(share * len(gpus)))
    idle = {int(g) for g in rng.permutation(gpus)[keep:]}
    return [_idle(tick, tdp_w, idle) for tick in ticks]


@dataclass(frozen=True)
class Family:
    """An evasion family and the strengths it is tried at."""

    name: str
    transform: Transform
    strengths: tuple[float, ...]
    strength_meaning: str


FAMILIES: tuple[Family, ...] = (
    Family("unchanged", unchanged, (0.0,), "baseline"),
    Family("idle_gaps", idle_gaps, (0.2, 0.5), "share of time idle"),
    Family("power_cap", power_cap, (0.5, 0.3), "cap as share of TDP"),
    Family("duty_cycle", duty_cycle, (0.3, 0.5), "share of each cycle idle"),
    Family("period_jitter", period_jitter, (0.2, 0.5), "timing spread"),
    Family("inference_bursts", inference_bursts, (0.3, 0.6), "share of time bursty"),
    Family("partial_gpus", partial_gpus, (0.5, 0.125), "share of GPUs training"),
)


@dataclass(frozen=True)
class EvasionResult:
    """One family at one strength, over every held-out training recording and trial."""

    family: str
    strength: float
    strength_meaning: str
    runs: int
    detected: int
    window_detection: float  # share of windows called training, over all runs

    @property
    def detection_rate(self) -> float:
        """Share of runs whose recording verdict stayed training."""
        return self.detected / self.runs if self.runs else 0.0


def attack(
    name: str,
    label: str,
    ticks: Sequence[Tick],
    gpu_name: str,
    model: StumpModel,
) -> HeldOut:
    """Classify transformed ticks with a model that never saw the original recording."""
    indices = sorted({s.gpu_index for tick in ticks for s in tick.samples})
    rows = tuple(window_rows(name, label, ticks, gpu_descriptions(indices, gpu_name)))
    return classify_held_out(RecordingData(name, label, rows, first_busy_s(ticks)), model)


def run_evasion_suite(
    data_dir: Path,
    *,
    seed: int = 0,
    trials: int = 2,
    settings: FitSettings = DEFAULT_SETTINGS,
    families: Sequence[Family] = FAMILIES,
) -> list[EvasionResult]:
    """Every family and strength against every training recording, held out from the fit."""
    items = discover(data_dir)
    data = {item.name: load_recording_data(item) for item in items}
    tallies: dict[tuple[str, float], list[HeldOut]] = {}
    for item in (i for i in items if i.label == "training"):
        fitting = [row for name, d in data.items() if name != item.name for row in d.rows]
        assert_disjoint({row.recording for row in fitting}, [item.name])
        model = fit_model(fitting, settings)
        ticks = rebased(parse_recording(item.path))
        sku = sku_for(item.gpu_name)
        tdp_w = sku.tdp_w if sku is not None else _DEFAULT_TDP_W
        for index, family in enumerate(families):
            for strength in family.strengths:
                for trial in range(trials):
                    rng = np.random.default_rng([seed, index, trial, round(strength * 1000)])
                    changed = family.transform(ticks, rng, strength, tdp_w)
                    held = attack(
                        f"{item.name}:{family.name}", "training", changed, item.gpu_name, model
                    )
                    tallies.setdefault((family.name, strength), []).append(held)
    return [
        _result(family, strength, tallies.get((family.name, strength), []))
        for family in families
        for strength in family.strengths
    ]


def _result(family: Family, strength: float, runs: Sequence[HeldOut]) -> EvasionResult:
    windows = [label for held in runs for label in held.labels]
    return EvasionResult(
        family=family.name,
        strength=strength,
        strength_meaning=family.strength_meaning,
        runs=len(runs),
        detected=sum(held.verdict == "training" for held in runs),
        window_detection=(windows.count("training") / len(windows)) if windows else 0.0,
    )


def evasion_report_markdown(results: Sequence[EvasionResult]) -> str:
    """The suite's results as a Markdown table."""
    lines = [
        "| family | strength | runs | recordings still called training | windows called training |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.family} | {r.strength:g} ({r.strength_meaning}) | {r.runs} | "
            f"{r.detected}/{r.runs} ({100.0 * r.detection_rate:.0f} %) | "
            f"{100.0 * r.window_detection:.0f} % |"
        )
    return "\n".join(lines)
