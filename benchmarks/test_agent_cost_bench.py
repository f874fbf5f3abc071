"""What the agent costs a GPU host: CPU per GPU at 10 Hz sampling, and daemon memory.

* ``agent.cpu_per_gpu_10hz``: the daemon's per-window work (replay collector, windows,
  features, evidence, Ed25519 signing, durable spool append) over a synthetic 8-GPU trace
  sampled at 10 Hz, replayed as fast as possible in this process; CPU seconds from
  ``time.process_time`` over replayed GPU-seconds = the fraction of one core per GPU.
  Reading NVML costs CPU too (ioctls into the driver); that could not be measured here.
* ``agent.rss_mb`` / ``agent.rss_mb_with_probes``: peak resident memory of a real agent
  process (``gpuattest agent run``, which validates its settings and execs the sampling
  daemon in its place) replaying the trace to a real verifier, without and with CPU probe
  rounds every 2 s (each round a separate worker process, whose own peak is in the extra
  info). The run without probes also gives the CPU figure of a whole agent process (psutil,
  gRPC sending and the event loop included, start-up excluded) as extra info ``cpu_per_gpu``.
* ``agent.rss_mb_fake_nvml``: the sampling daemon on the live NVML code path, reading a fake
  NVML library (eight H100s) in real time at 10 Hz; ``libnvidia-ml.so``'s own memory on a GPU
  host is not in it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from agent.collectors.replay import Recording, ReplayCollector, write_canonical_trace
from agent.collectors.synthetic import generate_training_trace
from agent.evidence import GpuFeatures, WindowClaims, build_evidence, sign_evidence
from agent.features import window_features
from agent.samples import HostDescription
from agent.spool import Spool
from agent.windows import Window, WindowAssembler, raw_samples_bytes
from benchmarks.agent_runs import AgentRun, enrol, run_agent, run_fake_nvml_sampler, verifier
from benchmarks.conftest import BenchResult, Budget, record
from proto.signing import Ed25519Signer

GPUS = 8
INTERVAL_S = 0.1  # 10 Hz
WINDOW_S = 10.0
CPU_MAX_FRAC = 0.002  # 0.2 % of one core per GPU
RSS_MAX_MB = 80.0
SIGNER = Ed25519Signer.from_seed(bytes(32))
PROBE_ENV = {"GPUATTEST_AGENT_PROBES": "on", "GPUATTEST_AGENT_PROBE_INTERVAL_S": "2"}
# Short: a replay holds its whole recording in memory, which live NVML sampling does not.
RSS_TRACE_S = 60.0


def _seal(window: Window, host: HostDescription, spool: Spool) -> None:
    """What the daemon does per window, minus the network."""
    features = window_features(window, host.gpus)
    counts: dict[int, int] = {}
    for tick in window.ticks:
        for sample in tick.samples:
            counts[sample.gpu_index] = counts.get(sample.gpu_index, 0) + 1
    claims = WindowClaims(
        start_unix_s=window.start_unix_s,
        end_unix_s=window.end_unix_s,
        host=host,
        gpus=[GpuFeatures(i, "", n, features[i]) for i, n in sorted(counts.items())],
        raw_samples=raw_samples_bytes(window),
        source="synthetic-replay",
    )
    sequence = spool.next_sequence()
    evidence = build_evidence(
        claims,
        agent_id="agt-bench",
        key_id=SIGNER.key_id,
        sequence=sequence,
        previous_sha256=spool.chain_head(),
        created_unix_ns=time.time_ns(),
    )
    spool.append(sequence, sign_evidence(evidence, SIGNER), claims.raw_samples)


def _replay_through_pipeline(recording: Recording, spool_path: Path) -> int:
    collector = ReplayCollector(recording, clock=time.time, speed=0, hostname="bench")
    host = collector.describe_host()
    assembler = WindowAssembler(WINDOW_S)
    windows = 0
    with Spool(spool_path, 1 << 30) as spool:
        while (tick := collector.read_tick()) is not None:
            for window in assembler.add(tick):
                _seal(window, host, spool)
                windows += 1
        last = assembler.flush()
        if last is not None:
            _seal(last, host, spool)
            windows += 1
    return windows


def test_agent_cpu_per_gpu_10hz(
    benchmark: BenchmarkFixture, budget: Budget, tmp_path: Path
) -> None:
    recording = generate_training_trace(
        seed=5, gpus=GPUS, seconds=budget.trace_s, interval_s=INTERVAL_S
    )
    cpu_s: list[float] = []

    def replay() -> None:
        started = time.process_time()
        windows = _replay_through_pipeline(recording, tmp_path / f"spool-{len(cpu_s)}.sqlite")
        cpu_s.append(time.process_time() - started)
        assert windows >= budget.trace_s // WINDOW_S

    # pytest-benchmark leaves pedantic() unannotated.
    benchmark.pedantic(replay, rounds=budget.rounds, iterations=1)  # type: ignore[no-untyped-call]
    fraction = statistics.median(cpu_s) / (recording.duration_s * GPUS)
    benchmark.extra_info.update(trace_s=recording.duration_s, gpus=GPUS, sample_hz=10)
    record(
        benchmark,
        BenchResult(
            name="agent.cpu_per_gpu_10hz",
            device="cpu",
            rate=fraction,
            unit="core fraction/GPU",
            target=f"rate <= {CPU_MAX_FRAC}",
            passed=fraction <= CPU_MAX_FRAC,
        ),
    )


@pytest.fixture(scope="module")
def rss_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recording = generate_training_trace(
        seed=6, gpus=GPUS, seconds=RSS_TRACE_S, interval_s=INTERVAL_S
    )
    path = tmp_path_factory.mktemp("trace") / "synthetic-rss-training.csv"
    return write_canonical_trace(path, recording.ticks, source="synthetic", synthetic=True)


def _measure_agent(
    benchmark: BenchmarkFixture,
    workdir: Path,
    trace: Path,
    budget: Budget,
    *,
    probes: bool,
) -> AgentRun:
    runs: list[AgentRun] = []
    speed = RSS_TRACE_S / budget.agent_run_s
    with verifier(workdir) as (db_url, port):

        def one_run() -> None:
            state_dir = workdir / f"agent-{len(runs)}"
            enrol(db_url, port, state_dir)
            env = PROBE_ENV if probes else None
            runs.append(run_agent(state_dir, port, trace, speed=speed, gpus=GPUS, env=env))

        # pytest-benchmark leaves pedantic() unannotated.
        benchmark.pedantic(one_run, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    (run,) = runs
    benchmark.extra_info.update(
        steady_rss_mb=run.steady_rss_mb,
        worker_peak_rss_mb=run.worker_peak_rss_mb,
        probe_workers_seen=run.workers_seen,
        windows_sealed=run.windows_sealed,
        replay_speed=speed,
        gpus=GPUS,
    )
    return run


def _record_rss(benchmark: BenchmarkFixture, name: str, run: AgentRun) -> None:
    record(
        benchmark,
        BenchResult(
            name=name,
            device="cpu",
            rate=run.peak_rss_mb,
            unit="MB",
            limit_rate=RSS_MAX_MB,
            ratio=run.peak_rss_mb / RSS_MAX_MB,
            target=f"rate <= {RSS_MAX_MB:g} MB",
            passed=run.peak_rss_mb <= RSS_MAX_MB,
        ),
    )


def test_agent_rss_mb(
    benchmark: BenchmarkFixture, rss_trace: Path, budget: Budget, tmp_path: Path
) -> None:
    run = _measure_agent(benchmark, tmp_path, rss_trace, budget, probes=False)
    assert run.workers_seen == 0
    _record_rss(benchmark, "agent.rss_mb", run)
    benchmark.extra_info["cpu_per_gpu"] = run.cpu_per_gpu


def test_agent_rss_mb_with_probes(
    benchmark: BenchmarkFixture, rss_trace: Path, budget: Budget, tmp_path: Path
) -> None:
    run = _measure_agent(benchmark, tmp_path, rss_trace, budget, probes=True)
    assert run.workers_seen > 0, "no probe worker ran: probes are not wired into the agent"
    _record_rss(benchmark, "agent.rss_mb_with_probes", run)


def test_agent_rss_mb_fake_nvml(
    benchmark: BenchmarkFixture, budget: Budget, tmp_path: Path
) -> None:
    runs: list[AgentRun] = []
    with verifier(tmp_path) as (db_url, port):
        state_dir = tmp_path / "agent"
        enrol(db_url, port, state_dir)

        def one_run() -> None:
            runs.append(
                run_fake_nvml_sampler(state_dir, port, seconds=budget.agent_run_s, gpus=GPUS)
            )

        # pytest-benchmark leaves pedantic() unannotated.
        benchmark.pedantic(one_run, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    (run,) = runs
    assert run.windows_sealed > 0
    benchmark.extra_info.update(steady_rss_mb=run.steady_rss_mb, windows_sealed=run.windows_sealed)
    _record_rss(benchmark, "agent.rss_mb_fake_nvml", run)
