"""The daemon's side of probing: when to probe, and what the results add to evidence.

:class:`ProbeScheduler` watches the ticks the daemon samples (the tenant's utilization is
the governor's contention source), asks the :class:`~agent.probes.governor.DutyCycleGovernor`
which GPUs may be probed, runs one worker round for them (never torch in this process),
and keeps the results until the daemon seals the next window. Each window then carries the
probe results in its evidence and, per probed GPU, these features:

* ``probe_gemm_frac_of_limit`` / ``probe_bandwidth_frac_of_limit``: achieved rate over the
  SKU's reference (only for a known SKU; capped at 3, the verifier's bound);
* ``probe_gemm_slowdown_frac`` / ``probe_bandwidth_slowdown_frac``: ``1 - rate / best rate
  seen on this GPU since the agent started``, the share of the rate the tenant's work took
  (compute-bound tenants slow the GEMM, memory-bound ones the copy);
* ``probe_launch_latency_s``.

Probes run on the CPU (replay mode, ``probes = "on"``) are reported as evidence with
device "cpu" but add no GPU features: they say nothing about the replayed GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.config import AgentConfig
from agent.probes.batch import ProbeBatch
from agent.probes.governor import DutyCycleGovernor, GovernorPolicy, Verdict
from agent.probes.measurement import ALL_KINDS, ProbeKind, ProbeMeasurement
from agent.probes.reference import probe_result
from agent.probes.runner import (
    DEFAULT_TIMEOUT_S,
    ProbeTarget,
    ProbeWorkerError,
    WorkerReport,
    WorkerRequest,
    run_worker_async,
)
from agent.samples import GpuDescription, HostDescription, Tick
from proto.evidence_pb2 import ProbeResult

log = logging.getLogger(__name__)

WorkerRunner = Callable[[WorkerRequest, float], Awaitable[WorkerReport]]
MAX_FRAC_OF_LIMIT = 3.0  # the verifier's bound on *_frac_of_limit features
US_PER_S = 1e6
# The CPU is one device; its rounds are charged to this key.
CPU_KEY = 0


@dataclass(frozen=True)
class ProbePlan:
    """What to probe and how (from the agent's settings)."""

    device: Literal["cpu", "cuda"]
    kinds: tuple[ProbeKind, ...] = ALL_KINDS
    threads: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    poll_interval_s: float = 1.0


@dataclass
class ProbeStats:
    """What the scheduler did, for logs and tests."""

    rounds: int = 0
    failures: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class LatestUtilization:
    """Contention source from sampled ticks: the tenant's latest GPU utilization."""

    def __init__(self) -> None:
        self._busy: dict[int, float] = {}

    def observe(self, tick: Tick) -> None:
        """Remember each GPU's utilization at ``tick``."""
        for sample in tick.samples:
            util = sample.values.get("util_gpu_pct")
            if util is not None:
                self._busy[sample.gpu_index] = min(max(util / 100.0, 0.0), 1.0)

    def tenant_busy_frac(self, gpu_index: int) -> float | None:
        """Utilization / 100 at the last tick that read it; None if never read."""
        return self._busy.get(gpu_index)


class ProbeScheduler:
    """Runs probe rounds under the governor and hands results to the sealing daemon."""

    def __init__(
        self,
        plan: ProbePlan,
        policy: GovernorPolicy,
        *,
        clock: Callable[[], float],
        runner: WorkerRunner = run_worker_async,
    ) -> None:
        self._plan = plan
        self._utilization = LatestUtilization()
        self._governor = DutyCycleGovernor(policy, clock=clock, contention=self._utilization)
        self._runner = runner
        self._results: list[ProbeResult] = []
        self._features: dict[int, dict[str, float]] = {}
        self._sizes: dict[int, ProbeTarget] = {}  # sizes chosen by earlier rounds
        self._best: dict[tuple[int, ProbeKind], float] = {}
        self._last_device_s: dict[int, float] = {}
        self.stats = ProbeStats()

    @property
    def plan(self) -> ProbePlan:
        """What this scheduler probes and how."""
        return self._plan

    def observe(self, tick: Tick) -> None:
        """Feed every sampled tick: utilization drives the governor's back-off."""
        self._utilization.observe(tick)

    async def run(self, host: HostDescription) -> None:
        """Probe whenever the governor allows, until cancelled.

        A bug in probing must not stop attestation: it is logged and probing stops.
        """
        try:
            while True:
                await self.probe_once(host)
                await asyncio.sleep(self._plan.poll_interval_s)
        except Exception:
            log.exception("probing stopped after an unexpected error; sampling goes on")

    async def probe_once(self, host: HostDescription) -> None:
        """One round over the devices the governor allows now (none: returns at once)."""
        gpus = self._due(host)
        if not gpus:
            return
        request = WorkerRequest(
            device=self._plan.device,
            targets=tuple(self._sizes.get(key, ProbeTarget(gpu_index=key)) for key in gpus),
            kinds=self._plan.kinds,
            threads=self._plan.threads,
        )
        self.stats.rounds += 1
        try:
            report = await self._runner(request, self._plan.timeout_s)
        except ProbeWorkerError as error:
            self.stats.failures += 1
            log.warning("probe round failed: %s", error)
            for key in gpus:  # still charged, so a broken worker is not respawned every poll
                self._governor.record(key, 0.0)
            return
        for message in report.errors:
            log.warning("probe skipped: %s", message)
        self._absorb(report, gpus)

    def take(self) -> ProbeBatch:
        """Results and features gathered since the last call (for the window being sealed)."""
        batch = ProbeBatch(tuple(self._results), self._features)
        self._results, self._features = [], {}
        return batch

    def _due(self, host: HostDescription) -> dict[int, GpuDescription | None]:
        candidates: dict[int, GpuDescription | None]
        if self._plan.device == "cpu":
            candidates = {CPU_KEY: None}
        else:
            # CUDA cannot address a MIG-partitioned GPU by its index; its slices are the
            # tenant's, and probing them is out of scope for now.
            candidates = {gpu.index: gpu for gpu in host.gpus if not gpu.mig_instances}
        due = {}
        for key, gpu in candidates.items():
            verdict = self._governor.decide(key, self._last_device_s.get(key, 0.0))
            if verdict is Verdict.RUN:
                due[key] = gpu
            else:
                self.stats.skipped[verdict] = self.stats.skipped.get(verdict, 0) + 1
        return due

    def _absorb(self, report: WorkerReport, gpus: Mapping[int, GpuDescription | None]) -> None:
        device_s: dict[int, float] = dict.fromkeys(gpus, 0.0)
        for measurement in report.measurements:
            key = measurement.gpu_index
            if key not in gpus:
                continue  # not asked for: a confused worker must not charge another GPU
            device_s[key] += measurement.duration_s
            self._remember_size(measurement)
            busy = None if measurement.device_kind == "cpu" else self._busy(key)
            result = probe_result(measurement, gpus[key], busy)
            self._results.append(result)
            if measurement.device_kind == "cuda":
                self._features.setdefault(key, {}).update(self._features_of(measurement, result))
        for key, seconds in device_s.items():
            self._governor.record(key, seconds)
            self._last_device_s[key] = seconds

    def _busy(self, gpu_index: int) -> float | None:
        return self._utilization.tenant_busy_frac(gpu_index)

    def _remember_size(self, measurement: ProbeMeasurement) -> None:
        key = measurement.gpu_index
        target = self._sizes.get(key, ProbeTarget(gpu_index=key))
        if measurement.kind is ProbeKind.GEMM:
            target = target.model_copy(update={"gemm_size": measurement.size})
        elif measurement.kind is ProbeKind.BANDWIDTH:
            target = target.model_copy(update={"bandwidth_bytes": measurement.size})
        self._sizes[key] = target

    def _features_of(self, measurement: ProbeMeasurement, result: ProbeResult) -> dict[str, float]:
        kind = measurement.kind
        if kind is ProbeKind.LAUNCH_LATENCY:
            return {"probe_launch_latency_s": measurement.rate / US_PER_S}
        best_key = (measurement.gpu_index, kind)
        best = max(self._best.get(best_key, 0.0), measurement.rate)
        self._best[best_key] = best
        features = {f"probe_{kind}_slowdown_frac": min(max(1 - measurement.rate / best, 0.0), 1.0)}
        if result.reference_rate > 0:
            features[f"probe_{kind}_frac_of_limit"] = min(result.ratio, MAX_FRAC_OF_LIMIT)
        return features


def build_prober(
    settings: AgentConfig, collector_source: str, clock: Callable[[], float] = time.monotonic
) -> ProbeScheduler | None:
    """The scheduler ``settings`` ask for, or None when probes are off for this source.

    Live NVML sampling probes the GPUs; a replay probes the CPU only with ``probes = "on"``.
    """
    if not settings.probes_enabled(collector_source):
        return None
    live = collector_source == "nvml"
    plan = ProbePlan(
        device="cuda" if live else "cpu",
        threads=settings.probe_threads,
        timeout_s=settings.probe_timeout_s,
    )
    policy = GovernorPolicy(
        budget_frac=settings.probe_budget_frac, min_interval_s=settings.probe_interval_s
    )
    return ProbeScheduler(plan, policy, clock=clock)
