"""The probe worker: ``python -m agent.probes.worker`` runs one round and exits.

It reads a :class:`~agent.probes.runner.WorkerRequest` as JSON on stdin, runs the probes
and writes a :class:`~agent.probes.runner.WorkerReport` as JSON on stdout. Exiting is the
point: the CUDA context and every byte of device memory go with the process, so nothing
of ours stays on a tenant's GPU between rounds.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agent.probes.measurement import ProbeKind, ProbeMeasurement
from agent.probes.runner import ProbeTarget, WorkerReport, WorkerRequest

if TYPE_CHECKING:
    from agent.probes.kernels import ProbeDevice

_EXIT_BAD_REQUEST = 2


def _size_for(kind: ProbeKind, target: ProbeTarget) -> int | None:
    if kind is ProbeKind.GEMM:
        return target.gemm_size
    if kind is ProbeKind.BANDWIDTH:
        return target.bandwidth_bytes
    return None


def _probe_device(
    device: ProbeDevice, target: ProbeTarget, kinds: tuple[ProbeKind, ...]
) -> tuple[list[ProbeMeasurement], list[str]]:
    from agent.probes.kernels import ProbeUnavailableError, run_probe

    measurements, errors = [], []
    for kind in kinds:
        try:
            measurements.append(run_probe(kind, device, _size_for(kind, target)))
        # torch raises RuntimeError (torch.cuda.OutOfMemoryError among them) when the
        # tenant's work leaves too little room; one failed probe must not lose the rest.
        except (ProbeUnavailableError, RuntimeError) as error:
            errors.append(f"{kind} on {device.label}: {error}")
    return measurements, errors


def run_request(request: WorkerRequest) -> WorkerReport:
    """Run every probe ``request`` asks for; failures become ``errors`` entries."""
    # Imported only once the request is known to be good: a bad one fails fast.
    import torch

    from agent.probes.kernels import ProbeUnavailableError, open_device

    torch.set_num_threads(request.threads)
    cuda = request.device == "cuda" or (request.device == "auto" and torch.cuda.is_available())
    # A CPU is one device: probe it once, under the first target's index.
    targets = request.targets if cuda else request.targets[:1]
    measurements: list[ProbeMeasurement] = []
    errors: list[str] = []
    for target in targets:
        try:
            device = open_device("cuda" if cuda else "cpu", target.gpu_index)
        except ProbeUnavailableError as error:
            errors.append(f"GPU {target.gpu_index}: {error}")
            continue
        done, failed = _probe_device(device, target, request.kinds)
        measurements += done
        errors += failed
        if cuda:
            torch.cuda.empty_cache()  # the next GPU's probes should not see our leftovers
    return WorkerReport(
        device_kind="cuda" if cuda else "cpu",
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
        measurements=tuple(measurements),
        errors=tuple(errors),
    )


def main() -> int:
    """Entry point: request on stdin, report on stdout; 2 for an unreadable request."""
    try:
        request = WorkerRequest.model_validate_json(sys.stdin.buffer.read())
    except ValidationError as error:
        print(f"probe worker: bad request: {error}", file=sys.stderr)
        return _EXIT_BAD_REQUEST
    sys.stdout.write(run_request(request).model_dump_json())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
