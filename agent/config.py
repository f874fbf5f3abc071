"""The running agent's configuration as plain data: no pydantic, no click.

`gpuattest agent run` validates its settings (:class:`agent.settings.AgentSettings`: TOML, the
environment and flags, with pydantic-settings) and then replaces itself with the sampling
daemon (:mod:`agent.sampler`), handing it an :class:`AgentConfig` as JSON. The daemon runs for
months on every GPU host, so it carries only what sampling needs: the validation library and
the command-line parser stay behind in the launcher (about 13 MB of resident memory).

Fields have no defaults: an AgentConfig is made from validated settings
(``AgentSettings.config()``), whose field descriptions, defaults and limits are the one place
to read about them; ``tests/agent/test_config.py`` keeps the two field lists equal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from proto.errors import GpuattestError

CollectorKind = Literal["auto", "nvml", "replay"]
ProbeMode = Literal["auto", "on", "off"]


class ConfigFormatError(GpuattestError):
    """The daemon was handed a configuration it cannot read."""


@dataclass(frozen=True)
class AgentConfig:
    """Validated agent settings (see :class:`agent.settings.AgentSettings` for each field)."""

    verifier: str
    state_dir: Path
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    insecure_plaintext: bool
    collector: CollectorKind
    replay_file: Path | None
    replay_speed: float
    hostname: str | None
    window_s: float
    sample_hz: float
    nvml_timeout_s: float
    process_interval_s: float
    proc_root: Path
    spool_max_mb: float
    batch_size: int
    challenge_interval_s: float
    exit_when_drained: bool
    probes: ProbeMode
    probe_interval_s: float
    probe_budget_frac: float
    probe_timeout_s: float
    probe_threads: int

    def probes_enabled(self, collector_source: str) -> bool:
        """Probe on live GPUs unless ``probes = "off"``; on a replay only with ``"on"``."""
        if self.probes == "auto":
            return collector_source == "nvml"
        return self.probes == "on"

    def to_json(self) -> str:
        """The configuration as one JSON object (paths as strings)."""
        return json.dumps(
            {
                name: str(value) if isinstance(value, Path) else value
                for name, value in asdict(self).items()
            }
        )

    @classmethod
    def from_json(cls, text: str) -> AgentConfig:
        """Read what :meth:`to_json` wrote; anything else raises ConfigFormatError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFormatError(f"agent configuration is not JSON: {exc}") from exc
        if not isinstance(data, dict) or set(data) != {item.name for item in fields(cls)}:
            raise ConfigFormatError("agent configuration does not have the agent's fields")
        return cls(**{name: _restore(name, value) for name, value in data.items()})


def _restore(name: str, value: Any) -> Any:
    return Path(value) if name in _path_fields() and value is not None else value


@cache
def _path_fields() -> frozenset[str]:
    """Fields typed ``Path`` or ``Path | None``: JSON holds them as strings."""
    hints = get_type_hints(AgentConfig)
    return frozenset(name for name, hint in hints.items() if Path in (hint, *get_args(hint)))
