"""Per-window costs on the agent's hot path, measured on this machine's CPU.

The issue on probes and benchmarks extends this suite; run it with ``make bench``.
"""

from __future__ import annotations

import time

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from agent.collectors.synthetic import generate_training_trace
from agent.evidence import GpuFeatures, WindowClaims, build_evidence, sign_evidence
from agent.features import window_features
from agent.samples import HostDescription
from agent.windows import Window, WindowAssembler, raw_samples_bytes
from proto import envelope as dsse
from proto.signing import Ed25519Signer

SIGNER = Ed25519Signer.from_seed(bytes(32))


@pytest.fixture(scope="module")
def window() -> Window:
    """One full 10 s window of 8 synthetic GPUs sampled at 10 Hz."""
    recording = generate_training_trace(seed=1, gpus=8, seconds=25.0, interval_s=0.1)
    assembler = WindowAssembler(10.0)
    return next(w for tick in recording.ticks for w in assembler.add(tick))


def test_features_for_8_gpu_window(
    benchmark: BenchmarkFixture, window: Window, device_info: dict[str, str]
) -> None:
    benchmark.extra_info.update(device_info)
    features = benchmark(window_features, window, ())
    assert len(features) == 8


def test_build_and_sign_8_gpu_evidence(
    benchmark: BenchmarkFixture, window: Window, device_info: dict[str, str]
) -> None:
    benchmark.extra_info.update(device_info)
    features = window_features(window, ())
    claims = WindowClaims(
        start_unix_s=window.start_unix_s,
        end_unix_s=window.end_unix_s,
        host=HostDescription("bench"),
        gpus=[GpuFeatures(index, "", 100, values) for index, values in features.items()],
        raw_samples=raw_samples_bytes(window),
        source="synthetic-replay",
    )

    def seal() -> bytes:
        evidence = build_evidence(
            claims,
            agent_id="agt-bench",
            key_id=SIGNER.key_id,
            sequence=1,
            previous_sha256=dsse.GENESIS_HASH,
            created_unix_ns=time.time_ns(),
        )
        return sign_evidence(evidence, SIGNER)

    envelope = benchmark(seal)
    assert len(envelope) > 1000
