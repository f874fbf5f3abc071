"""Where samples come from: live NVML, or a replayed recording (real or synthetic)."""

from __future__ import annotations

from collections.abc import Callable

from agent.samples import Collector
from agent.settings import AgentSettings
from proto.errors import GpuattestError


class NoCollectorError(GpuattestError):
    """Neither a GPU nor a recording to replay is available."""


def open_collector(
    settings: AgentSettings, *, hostname: str, clock: Callable[[], float]
) -> Collector:
    """The collector ``settings`` asks for: a replay when a file is given (unless NVML is
    demanded), else NVML; fails clearly when neither is possible."""
    # Imported here so that choosing one source never loads the other's dependencies.
    if settings.replay_file is not None and settings.collector != "nvml":
        from agent.collectors.replay import ReplayCollector, parse_recording

        return ReplayCollector(
            parse_recording(settings.replay_file),
            clock=clock,
            speed=settings.replay_speed,
            hostname=hostname,
        )
    if settings.collector == "replay":
        raise NoCollectorError("collector 'replay' needs a recording: pass --replay FILE")
    from agent.collectors.nvml import open_nvml

    collector = open_nvml(clock=clock, call_timeout_s=settings.nvml_timeout_s, hostname=hostname)
    if collector is None:
        raise NoCollectorError(
            "no NVIDIA GPU found (NVML unavailable); replay a recording with --replay FILE"
        )
    return collector
