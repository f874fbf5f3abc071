"""The daemon's side of probing, with a scripted worker and a fake clock."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from agent.probes.governor import GovernorPolicy
from agent.probes.measurement import UNITS, DeviceKind, ProbeKind, ProbeMeasurement
from agent.probes.runner import ProbeWorkerError, WorkerReport, WorkerRequest
from agent.probes.scheduler import ProbePlan, ProbeScheduler, build_prober
from agent.samples import GpuDescription, GpuSample, HostDescription, MigDescription, Tick
from agent.settings import AgentSettings
from server.appraisal import _FEATURE_BOUNDS

H100 = "NVIDIA H100 80GB HBM3"
HOST = HostDescription(
    "host-a",
    gpus=(
        GpuDescription(0, "GPU-synthetic-0", H100, 81559, 700.0),
        GpuDescription(1, "GPU-synthetic-1", H100, 81559, 700.0),
    ),
)
POLICY = GovernorPolicy(min_interval_s=60.0)
# Rates at the H100 references (GEMM 795 TFLOP/s, copy 2948 GB/s).
IDLE_RATES = {ProbeKind.GEMM: 795.0, ProbeKind.BANDWIDTH: 2948.0, ProbeKind.LAUNCH_LATENCY: 6.0}


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def measurement(
    gpu_index: int, kind: ProbeKind, rate: float, device_kind: DeviceKind = "cuda"
) -> ProbeMeasurement:
    return ProbeMeasurement(
        gpu_index=gpu_index,
        kind=kind,
        device=f"cuda:{gpu_index} {H100}" if device_kind == "cuda" else "cpu",
        device_kind=device_kind,
        precision="bf16" if kind is ProbeKind.GEMM and device_kind == "cuda" else "",
        size={ProbeKind.GEMM: 4096, ProbeKind.BANDWIDTH: 1 << 28}.get(kind, 0),
        rate=rate,
        unit=UNITS[kind],
        duration_s=0.001,
        repeats=5,
        ci95_rel=0.01,
        confident=True,
    )


@dataclass
class ScriptedWorker:
    """Answers each round with every kind for every target at ``rates`` x ``scale``."""

    scale: float = 1.0
    fail: bool = False
    extra: list[ProbeMeasurement] = field(default_factory=list)
    requests: list[WorkerRequest] = field(default_factory=list)

    async def __call__(self, request: WorkerRequest, timeout_s: float) -> WorkerReport:
        self.requests.append(request)
        if self.fail:
            raise ProbeWorkerError("scripted failure")
        device_kind: DeviceKind = "cpu" if request.device == "cpu" else "cuda"
        targets = request.targets[:1] if device_kind == "cpu" else request.targets
        found = [
            measurement(t.gpu_index, kind, IDLE_RATES[kind] * self.scale, device_kind)
            for t in targets
            for kind in request.kinds
        ]
        return WorkerReport(
            device_kind=device_kind,
            torch_version="test",
            threads=1,
            measurements=(*found, *self.extra),
        )


def scheduler(
    worker: ScriptedWorker, clock: FakeClock, device: DeviceKind = "cuda"
) -> ProbeScheduler:
    return ProbeScheduler(ProbePlan(device=device), POLICY, clock=clock, runner=worker)


def busy_tick(util_pct: float) -> Tick:
    return Tick(0.0, tuple(GpuSample(i, {"util_gpu_pct": util_pct}) for i in (0, 1)))


async def test_a_round_yields_results_and_features_per_gpu() -> None:
    prober = scheduler(ScriptedWorker(), FakeClock())
    prober.observe(busy_tick(0.0))
    await prober.probe_once(HOST)
    batch = prober.take()
    assert sorted((r.gpu_index, r.kind) for r in batch.results) == sorted(
        (g, str(k)) for g in (0, 1) for k in ProbeKind
    )
    gemm = next(r for r in batch.results if r.kind == "gemm")
    assert gemm.identity == "consistent"
    assert gemm.ratio == pytest.approx(1.0)
    assert batch.features[0] == {
        "probe_gemm_frac_of_limit": pytest.approx(1.0),
        "probe_gemm_slowdown_frac": 0.0,
        "probe_bandwidth_frac_of_limit": pytest.approx(1.0),
        "probe_bandwidth_slowdown_frac": 0.0,
        "probe_launch_latency_s": pytest.approx(6e-6),
    }
    assert prober.take().results == ()  # taken once


async def test_slowdown_is_measured_against_the_best_rate_seen() -> None:
    worker, clock = ScriptedWorker(), FakeClock()
    prober = scheduler(worker, clock)
    await prober.probe_once(HOST)
    prober.take()
    clock.now += POLICY.min_interval_s
    worker.scale = 0.6  # the tenant's work took 40 % of the probe's rate
    prober.observe(busy_tick(97.0))
    await prober.probe_once(HOST)
    features = prober.take().features[1]
    assert features["probe_gemm_slowdown_frac"] == pytest.approx(0.4)
    assert features["probe_bandwidth_slowdown_frac"] == pytest.approx(0.4)


async def test_later_rounds_reuse_the_sizes_and_respect_the_spacing() -> None:
    worker, clock = ScriptedWorker(), FakeClock()
    prober = scheduler(worker, clock)
    await prober.probe_once(HOST)
    await prober.probe_once(HOST)  # too soon: no second worker
    assert len(worker.requests) == 1
    assert prober.stats.skipped == {"too_soon": 2}
    clock.now += POLICY.min_interval_s
    await prober.probe_once(HOST)
    first, second = worker.requests
    assert first.targets[0].gemm_size is None
    assert second.targets[0].gemm_size == 4096
    assert second.targets[1].bandwidth_bytes == 1 << 28


async def test_a_failed_round_is_charged_and_adds_nothing() -> None:
    worker, clock = ScriptedWorker(fail=True), FakeClock()
    prober = scheduler(worker, clock)
    await prober.probe_once(HOST)
    await prober.probe_once(HOST)
    assert prober.stats.failures == 1
    assert len(worker.requests) == 1  # not respawned at every poll
    assert prober.take().results == ()


async def test_mig_partitioned_gpus_are_not_probed() -> None:
    mig = MigDescription(1, 0, "MIG-synthetic", "1g.10gb")
    host = HostDescription("h", gpus=(HOST.gpus[0], GpuDescription(1, mig_instances=(mig,))))
    worker = ScriptedWorker()
    await scheduler(worker, FakeClock()).probe_once(host)
    assert [t.gpu_index for t in worker.requests[0].targets] == [0]


async def test_cpu_probes_are_evidence_but_not_gpu_features() -> None:
    prober = scheduler(ScriptedWorker(), FakeClock(), device="cpu")
    await prober.probe_once(HOST)
    batch = prober.take()
    assert {r.device for r in batch.results} == {"cpu"}
    assert {r.identity for r in batch.results} == {"unknown-sku"}
    assert batch.features == {}


async def test_results_for_gpus_not_asked_for_are_dropped() -> None:
    stray = measurement(7, ProbeKind.GEMM, 795.0)
    prober = scheduler(ScriptedWorker(extra=[stray]), FakeClock())
    await prober.probe_once(HOST)
    assert 7 not in {r.gpu_index for r in prober.take().results}


@pytest.mark.parametrize("scale", [1e-6, 0.5, 1.0, 2.0, 50.0], ids=lambda s: f"x{s}")
async def test_features_stay_within_the_verifiers_bounds(scale: float) -> None:
    prober = scheduler(ScriptedWorker(scale=scale), FakeClock())
    await prober.probe_once(HOST)
    for features in prober.take().features.values():
        for name, value in features.items():
            bounds = [(lo, hi) for suffix, lo, hi in _FEATURE_BOUNDS if name.endswith(suffix)]
            assert bounds, f"{name} has no unit suffix the verifier knows"
            low, high = bounds[0]
            assert math.isfinite(value)
            assert low is None or value >= low, name
            assert high is None or value <= high, name


async def test_a_device_faster_than_its_sku_is_inconsistent() -> None:
    prober = scheduler(ScriptedWorker(scale=3.0), FakeClock())
    await prober.probe_once(HOST)
    identities = {r.identity for r in prober.take().results if r.kind != "launch_latency"}
    assert identities == {"inconsistent"}


PLANS = [
    pytest.param("auto", "nvml", "cuda", id="auto-live"),
    pytest.param("auto", "replay", None, id="auto-replay-off"),
    pytest.param("on", "nvml", "cuda", id="on-live"),
    pytest.param("on", "synthetic-replay", "cpu", id="on-replay-cpu"),
    pytest.param("off", "nvml", None, id="off-live"),
]


@pytest.mark.parametrize(("probes", "source", "device"), PLANS)
def test_settings_choose_the_probe_device(probes: str, source: str, device: str | None) -> None:
    settings = AgentSettings(probes=probes)
    prober = build_prober(settings.config(), source)
    assert (prober.plan.device if prober else None) == device


async def test_an_unexpected_error_stops_probing_but_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(request: WorkerRequest, timeout_s: float) -> WorkerReport:
        raise RuntimeError("a bug")

    prober = ProbeScheduler(ProbePlan(device="cuda"), POLICY, clock=FakeClock(), runner=broken)
    await prober.run(HOST)  # returns instead of raising into the daemon
    assert "probing stopped" in caplog.text
