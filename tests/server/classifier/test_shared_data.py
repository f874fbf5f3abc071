"""The real recordings in ../shared/data: every one parses; labels are found (skips if absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.collectors.replay import parse_recording
from server.classifier.dataset import discover

TELEMETRY = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "telemetry"

pytestmark = pytest.mark.shared_data


def _recordings() -> list[Path]:
    if not TELEMETRY.is_dir():
        return []
    folders = [TELEMETRY / "training", TELEMETRY / "inference" / "powertrace_sim"]
    return sorted(p for f in folders for p in f.rglob("*") if p.name.endswith((".csv", ".csv.gz")))


@pytest.fixture(autouse=True)
def _need_shared_data() -> None:
    if not TELEMETRY.is_dir():
        pytest.skip("../shared/data is absent")


def test_every_recording_parses_with_samples() -> None:
    paths = _recordings()
    assert len(paths) >= 18
    for path in paths:
        recording = parse_recording(path)
        assert recording.ticks, path
        assert recording.gpu_count >= 1, path


def test_every_recording_gets_a_label_and_the_labelled_gpus_a_known_sku() -> None:
    items = discover(TELEMETRY)
    assert {item.path.resolve() for item in items} == {p.resolve() for p in _recordings()}
    assert {item.label for item in items} == {"training", "inference"}
    named = [item for item in items if item.gpu_name]
    assert all(name.startswith("NVIDIA ") for name in {i.gpu_name for i in named})
    assert sum(item.label == "training" for item in items) == 4
