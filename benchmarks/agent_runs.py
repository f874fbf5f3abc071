"""Real ``gpuattest`` processes for the agent's memory and CPU figures.

A verifier serves on loopback with a fresh SQLite file; an agent enrols with a one-time
token and replays a synthetic trace at a set speed until everything is delivered. While it
runs, its resident memory (and that of any probe worker it spawns) is sampled with psutil.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.settings import AgentSettings
from gpuattest.demo import SEALED_LINE, SERVE_LINE

MIB = 1024 * 1024
SAMPLE_EVERY_S = 0.05
HOSTNAME = "bench-host"


@dataclass(frozen=True)
class AgentRun:
    """What one agent process did and held."""

    peak_rss_mb: float
    steady_rss_mb: float  # median over the second half of the run
    worker_peak_rss_mb: float | None  # largest probe worker seen; None if none ran
    workers_seen: int
    wall_s: float
    # CPU the agent used per replayed GPU-second in its steady state (fraction of a core).
    cpu_per_gpu: float
    windows_sealed: int


def _gpuattest(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpuattest", *args]


@contextmanager
def verifier(workdir: Path) -> Iterator[tuple[str, int]]:
    """A verifier on 127.0.0.1 with a fresh SQLite file: yields (db url, port)."""
    db_url = f"sqlite:///{workdir / 'verifier.db'}"
    command = _gpuattest(
        "verifier", "serve", "--listen", "127.0.0.1:0", "--db", db_url, "--insecure-plaintext"
    )
    with (workdir / "verifier.log").open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        match = SERVE_LINE.search(process.stdout.readline())
        if match is None:
            raise RuntimeError(f"the verifier did not start; see {workdir / 'verifier.log'}")
        yield db_url, int(match.group(1))
    finally:
        process.terminate()
        process.wait(timeout=30)


def enrol(db_url: str, port: int, state_dir: Path) -> None:
    """Enrol an agent keeping its key and spool in ``state_dir``."""
    token = subprocess.run(
        _gpuattest("verifier", "enroll-token", "--db", db_url, "--host", HOSTNAME),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        _gpuattest(
            "agent",
            "enroll",
            "--token",
            token,
            "--state-dir",
            str(state_dir),
            "--hostname",
            HOSTNAME,
            "--verifier",
            f"127.0.0.1:{port}",
            "--insecure-plaintext",
        ),
        capture_output=True,
        text=True,
        check=True,
    )


@dataclass
class _Samples:
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (t, CPU s)
    workers: dict[int, float] = field(default_factory=dict)  # pid -> peak MB


def _sample(process: psutil.Process, samples: _Samples, now: float) -> None:
    try:
        with process.oneshot():
            samples.rss.append((now, process.memory_info().rss / MIB))
            times = process.cpu_times()
            samples.cpu.append((now, times.user + times.system))
        for child in process.children(recursive=True):
            rss = child.memory_info().rss / MIB
            samples.workers[child.pid] = max(samples.workers.get(child.pid, 0.0), rss)
    except psutil.Error:
        pass  # exited between two calls


def run_agent(
    state_dir: Path,
    port: int,
    trace: Path,
    *,
    speed: float,
    gpus: int,
    entry: Sequence[str] = ("-m", "gpuattest"),
    env: Mapping[str, str] | None = None,
) -> AgentRun:
    """Replay ``trace`` through a real agent process at ``speed`` and watch it."""
    command = [
        sys.executable,
        *entry,
        "agent",
        "run",
        "--state-dir",
        str(state_dir),
        "--verifier",
        f"127.0.0.1:{port}",
        "--insecure-plaintext",
        *("--replay", str(trace), "--speed", str(speed), "--exit-when-drained"),
    ]
    return _watch(command, state_dir, speed=speed, gpus=gpus, env=env)


def run_fake_nvml_sampler(state_dir: Path, port: int, *, seconds: float, gpus: int) -> AgentRun:
    """Run the sampling daemon on a fake NVML (``benchmarks.agent_on_fake_nvml``) in real time
    for ``seconds``, then stop it with SIGTERM as a service manager would."""
    settings = AgentSettings(
        verifier=f"127.0.0.1:{port}",
        state_dir=state_dir,
        insecure_plaintext=True,
        collector="nvml",
        probes="off",
    )
    command = [sys.executable, "-m", "benchmarks.agent_on_fake_nvml", settings.config().to_json()]
    return _watch(command, state_dir, speed=1.0, gpus=gpus, stop_after_s=seconds)


def _watch(
    command: Sequence[str],
    state_dir: Path,
    *,
    speed: float,
    gpus: int,
    env: Mapping[str, str] | None = None,
    stop_after_s: float | None = None,
) -> AgentRun:
    """Run ``command`` (an agent) and sample its memory and CPU until it exits or is stopped."""
    started = time.monotonic()
    with (state_dir / "agent.log").open("w") as log:
        popen = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {})},
        )
    watched = psutil.Process(popen.pid)
    samples = _Samples()
    while popen.poll() is None:
        now = time.monotonic() - started
        _sample(watched, samples, now)
        if stop_after_s is not None and now >= stop_after_s:
            popen.terminate()
            popen.wait(timeout=30)
            break
        time.sleep(SAMPLE_EVERY_S)
    wall = time.monotonic() - started
    stdout = popen.stdout.read() if popen.stdout else ""
    match = SEALED_LINE.search(stdout)
    if popen.returncode != 0 or match is None or not samples.rss:
        raise RuntimeError(f"agent failed (status {popen.returncode}); see {state_dir}/agent.log")
    return AgentRun(
        peak_rss_mb=max(mb for _, mb in samples.rss),
        steady_rss_mb=statistics.median(mb for t, mb in samples.rss if t >= wall / 2),
        worker_peak_rss_mb=max(samples.workers.values()) if samples.workers else None,
        workers_seen=len(samples.workers),
        wall_s=wall,
        cpu_per_gpu=_steady_cpu_per_gpu(samples.cpu, speed, gpus),
        windows_sealed=int(match.group(1)),
    )


def _steady_cpu_per_gpu(cpu: list[tuple[float, float]], speed: float, gpus: int) -> float:
    """CPU seconds per replayed GPU-second between a quarter and the end of the run.

    Start-up (imports, enrolment state, the first connection) is left out: the figure is
    what the agent costs while it samples, windows, signs and sends.
    """
    start = next((t, c) for t, c in cpu if t >= cpu[-1][0] / 4)
    elapsed = cpu[-1][0] - start[0]
    return (cpu[-1][1] - start[1]) / (elapsed * speed * gpus) if elapsed > 0 else float("nan")
