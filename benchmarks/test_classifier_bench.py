"""Offline classification cost: an 8-GPU, 10-minute, 100 ms recording must take well under 1 s.

Measured from a parsed recording (cutting windows, features, model, hysteresis); parsing the
CSV text is the replay parser's cost and is measured on its own.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from agent.collectors.replay import Recording
from agent.collectors.synthetic import generate_training_trace
from server.classifier.model import StumpModel, load_packaged_model
from server.classifier.offline import classify_recording


@pytest.fixture(scope="module")
def recording() -> Recording:
    return generate_training_trace(seed=2, gpus=8, seconds=600.0, interval_s=0.1)


def test_classify_8_gpu_10_minute_100_ms_recording(
    benchmark: BenchmarkFixture, recording: Recording, device_info: dict[str, str]
) -> None:
    benchmark.extra_info.update(device_info)
    model: StumpModel = load_packaged_model()
    result = benchmark(classify_recording, recording, model, "NVIDIA H100 80GB HBM3")
    assert len(result.windows) == 8 * 60


def test_verifier_classifies_one_gpu_window(
    benchmark: BenchmarkFixture, recording: Recording, device_info: dict[str, str]
) -> None:
    benchmark.extra_info.update(device_info)
    model = load_packaged_model()
    features = classify_recording(recording, model).windows[0].features
    label, _ = benchmark(model.classify, features)
    assert label in ("training", "inference", "idle")
