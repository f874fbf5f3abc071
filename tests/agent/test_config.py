"""The plain configuration the sampling daemon runs with, and its JSON hand-over."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigFormatError
from agent.settings import AgentSettings


def test_config_has_exactly_the_settings_fields() -> None:
    assert [item.name for item in fields(AgentConfig)] == list(AgentSettings.model_fields)


@pytest.mark.parametrize(
    "settings",
    [
        AgentSettings(),
        AgentSettings(
            verifier="gpu-verifier.example:443",
            state_dir=Path("/var/lib/gpuattest"),
            tls_ca=Path("/etc/ca.pem"),
            tls_cert=Path("/etc/agent.pem"),
            tls_key=Path("/etc/agent.key"),
            collector="replay",
            replay_file=Path("/logs/run 1.csv.gz"),
            replay_speed=0.0,
            hostname="host-7",
            window_s=5.0,
            probes="on",
        ),
    ],
    ids=["defaults", "everything-set"],
)
def test_json_hand_over_round_trips(settings: AgentSettings) -> None:
    config = settings.config()
    assert AgentConfig.from_json(config.to_json()) == config


def _without(name: str) -> str:
    data = json.loads(AgentSettings().config().to_json())
    del data[name]
    return json.dumps(data)


def _with_extra() -> str:
    data = json.loads(AgentSettings().config().to_json())
    data["surprise"] = 1
    return json.dumps(data)


INVALID_HAND_OVERS = {
    "not-json": "{verifier:",
    "not-an-object": "[1, 2]",
    "field-missing": _without("window_s"),
    "unknown-field": _with_extra(),
}


@pytest.mark.parametrize("text", INVALID_HAND_OVERS.values(), ids=INVALID_HAND_OVERS.keys())
def test_unreadable_hand_over_is_refused(text: str) -> None:
    with pytest.raises(ConfigFormatError):
        AgentConfig.from_json(text)


@pytest.mark.parametrize(
    ("probes", "source", "enabled"),
    [
        ("auto", "nvml", True),
        ("auto", "replay", False),
        ("auto", "synthetic-replay", False),
        ("on", "replay", True),
        ("on", "nvml", True),
        ("off", "nvml", False),
    ],
)
def test_probes_run_on_live_gpus_unless_told_otherwise(
    probes: str, source: str, enabled: bool
) -> None:
    assert AgentSettings(probes=probes).config().probes_enabled(source) is enabled
