"""Run probes in a short-lived worker process, and the JSON both sides exchange.

The daemon never imports torch: it writes a :class:`WorkerRequest` to the stdin of
``python -m agent.probes.worker`` and reads a :class:`WorkerReport` from its stdout. The
worker exits after one round, taking its CUDA context and device memory with it. A worker
that hangs is killed after ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.probes.measurement import ALL_KINDS, ProbeKind, ProbeMeasurement
from proto.errors import GpuattestError

WORKER_MODULE = "agent.probes.worker"
DEFAULT_TIMEOUT_S = 120.0  # importing torch and creating a CUDA context can take a while
_STDERR_TAIL_CHARS = 2000


class ProbeWorkerError(GpuattestError):
    """The probe worker failed, timed out or answered something unreadable."""


class ProbeTarget(BaseModel):
    """One device to probe, with the sizes an earlier round chose (None: calibrate)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_index: int = Field(ge=0)  # NVML index; the worker orders CUDA devices to match
    gemm_size: int | None = Field(None, gt=0)
    bandwidth_bytes: int | None = Field(None, gt=0)


class WorkerRequest(BaseModel):
    """What one worker round should measure.

    ``device`` "cuda" probes each target's GPU; "cpu" probes the host CPU once, reported
    under the first target's index; "auto" picks CUDA when the worker finds a GPU.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    targets: tuple[ProbeTarget, ...] = Field(min_length=1)
    kinds: tuple[ProbeKind, ...] = ALL_KINDS
    threads: int = Field(1, ge=1)  # torch intra-op threads; on a CPU this is the probe's width


class WorkerReport(BaseModel):
    """What one worker round measured; ``errors`` lists probes that could not run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_kind: Literal["cpu", "cuda"]
    torch_version: str
    threads: int
    measurements: tuple[ProbeMeasurement, ...]
    errors: tuple[str, ...] = ()


def worker_command() -> list[str]:
    """The command line that starts a worker with this interpreter."""
    return [sys.executable, "-m", WORKER_MODULE]


def worker_environment() -> dict[str, str]:
    """The worker's environment: ours, with CUDA devices numbered as NVML numbers them."""
    # CUDA's default order is "fastest first"; NVML enumerates by PCI bus id. Without this
    # a probe of "GPU 3" could measure another device.
    return {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def parse_report(returncode: int, stdout: bytes, stderr: bytes) -> WorkerReport:
    """The worker's report, or ProbeWorkerError with the tail of its stderr."""
    if returncode != 0:
        tail = stderr.decode(errors="replace")[-_STDERR_TAIL_CHARS:]
        raise ProbeWorkerError(f"probe worker exited with status {returncode}: {tail}")
    try:
        return WorkerReport.model_validate_json(stdout)
    except ValidationError as error:
        raise ProbeWorkerError(f"probe worker answered an unreadable report: {error}") from error


def run_worker(request: WorkerRequest, timeout_s: float = DEFAULT_TIMEOUT_S) -> WorkerReport:
    """Run one worker round and wait for it (benchmarks, tests, one-off checks)."""
    try:
        completed = subprocess.run(
            worker_command(),
            input=request.model_dump_json().encode(),
            capture_output=True,
            timeout=timeout_s,
            env=worker_environment(),
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise ProbeWorkerError(f"probe worker timed out after {timeout_s:.0f} s") from error
    return parse_report(completed.returncode, completed.stdout, completed.stderr)


async def run_worker_async(
    request: WorkerRequest, timeout_s: float = DEFAULT_TIMEOUT_S
) -> WorkerReport:
    """Run one worker round without blocking the event loop; kills it on timeout or cancel."""
    process = await asyncio.create_subprocess_exec(
        *worker_command(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=worker_environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(request.model_dump_json().encode()), timeout_s
        )
    except TimeoutError as error:
        await _kill(process)
        raise ProbeWorkerError(f"probe worker timed out after {timeout_s:.0f} s") from error
    except asyncio.CancelledError:
        await _kill(process)  # a daemon shutting down must not leave a worker on the GPU
        raise
    assert process.returncode is not None  # communicate() waited for the exit
    return parse_report(process.returncode, stdout, stderr)


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()
