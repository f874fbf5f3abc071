"""The probe worker as a real child process: one round, then it is gone."""

from __future__ import annotations

import asyncio
import subprocess

import psutil
import pytest

from agent.probes.measurement import ALL_KINDS, ProbeKind
from agent.probes.runner import (
    ProbeTarget,
    ProbeWorkerError,
    WorkerRequest,
    parse_report,
    run_worker,
    run_worker_async,
    worker_command,
    worker_environment,
)

CPU_ROUND = WorkerRequest(device="cpu", targets=(ProbeTarget(gpu_index=0),))
# Sizes as an earlier round chose them: a CPU round reports under the first target's index.
SIZED_CPU_ROUND = WorkerRequest(
    device="cpu", targets=(ProbeTarget(gpu_index=5, gemm_size=128), ProbeTarget(gpu_index=6))
)


def live_children() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True) if child.is_running()]


def test_a_cpu_round_measures_every_kind_once_and_exits() -> None:
    report = run_worker(SIZED_CPU_ROUND)
    assert report.device_kind == "cpu"
    assert report.threads == 1
    assert report.errors == ()
    assert sorted(m.kind for m in report.measurements) == sorted(ALL_KINDS)
    assert all(m.rate > 0 and m.gpu_index == 5 for m in report.measurements)
    (gemm,) = (m for m in report.measurements if m.kind is ProbeKind.GEMM)
    assert gemm.size == 128
    assert live_children() == []


def test_cuda_on_a_machine_without_it_reports_errors_not_results() -> None:
    request = WorkerRequest(
        device="cuda", targets=(ProbeTarget(gpu_index=0),), kinds=(ProbeKind.LAUNCH_LATENCY,)
    )
    report = run_worker(request)
    if report.measurements:  # checked in the worker: this test process never imports torch
        pytest.skip("this machine has CUDA")
    assert report.device_kind == "cuda"
    assert len(report.errors) == 1
    assert "CUDA" in report.errors[0]


def test_a_hung_worker_is_killed_at_the_timeout() -> None:
    with pytest.raises(ProbeWorkerError, match="timed out"):
        run_worker(CPU_ROUND, timeout_s=0.05)
    assert live_children() == []


async def test_a_cancelled_round_kills_its_worker() -> None:
    task = asyncio.create_task(run_worker_async(CPU_ROUND))
    while not live_children():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live_children() == []


async def test_an_async_round_times_out_cleanly() -> None:
    with pytest.raises(ProbeWorkerError, match="timed out"):
        await run_worker_async(CPU_ROUND, timeout_s=0.05)
    assert live_children() == []


def test_a_bad_request_makes_the_worker_fail_fast() -> None:
    completed = subprocess.run(
        worker_command(), input=b"{}", capture_output=True, env=worker_environment(), check=False
    )
    with pytest.raises(ProbeWorkerError, match="status 2"):
        parse_report(completed.returncode, completed.stdout, completed.stderr)


BAD_REPORTS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"device_kind": "tpu"}', id="unknown-device"),
    pytest.param(
        b'{"device_kind":"cpu","torch_version":"x","threads":1,"measurements":[{"gpu_index":0,'
        b'"kind":"gemm","device":"cpu","device_kind":"cpu","precision":"fp32","size":64,'
        b'"rate":-1,"unit":"TFLOP/s","duration_s":0.1,"repeats":3,"ci95_rel":0.1,'
        b'"confident":false}]}',
        id="negative-rate",
    ),
]


@pytest.mark.parametrize("stdout", BAD_REPORTS)
def test_unreadable_reports_are_errors(stdout: bytes) -> None:
    with pytest.raises(ProbeWorkerError, match="unreadable"):
        parse_report(0, stdout, b"")


def test_cuda_devices_are_numbered_like_nvml() -> None:
    assert worker_environment()["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


BAD_REQUESTS = [
    pytest.param({"targets": []}, id="no-targets"),
    pytest.param({"targets": [{"gpu_index": -1}]}, id="negative-index"),
    pytest.param({"targets": [{"gpu_index": 0, "gemm_size": 0}]}, id="zero-size"),
    pytest.param({"targets": [{"gpu_index": 0}], "threads": 0}, id="no-threads"),
    pytest.param({"targets": [{"gpu_index": 0}], "device": "tpu"}, id="unknown-device"),
]


@pytest.mark.parametrize("fields", BAD_REQUESTS)
def test_invalid_requests_are_refused(fields: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        WorkerRequest.model_validate(fields)
