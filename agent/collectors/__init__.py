"""Where samples come from: live NVML, or a replayed recording (real or synthetic)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from agent.config import AgentConfig
from agent.samples import Collector
from proto.errors import GpuattestError


class NoCollectorError(GpuattestError):
    """Neither a GPU nor a recording to replay is available."""


def open_collector(
    settings: AgentConfig, *, hostname: str, clock: Callable[[], float]
) -> Collector:
    """The collector ``settings`` asks for: a replay when a file is given (unless NVML is
    demanded), else NVML; fails clearly when neither is possible."""
    # Imported here so that choosing one source never loads the other's dependencies.
    if settings.replay_file is not None and settings.collector != "nvml":
        from agent.collectors.replay import ReplayCollector, parse_recording

        replay = ReplayCollector(
            parse_recording(settings.replay_file),
            clock=clock,
            speed=settings.replay_speed,
            hostname=hostname,
        )
        _return_freed_heap()
        return replay
    if settings.collector == "replay":
        raise NoCollectorError("collector 'replay' needs a recording: pass --replay FILE")
    from agent.collectors.nvml import open_nvml

    collector = open_nvml(clock=clock, call_timeout_s=settings.nvml_timeout_s, hostname=hostname)
    if collector is None:
        raise NoCollectorError(
            "no NVIDIA GPU found (NVML unavailable); replay a recording with --replay FILE"
        )
    return collector


def _return_freed_heap() -> None:
    """Give the heap pages the recording's parser freed back to the OS (glibc; else no-op).

    Parsing a log allocates several times what the replay keeps; glibc holds freed pages for
    reuse, and the daemon, which runs for hours, would carry them in its RSS forever.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc: nothing to ask for
    malloc_trim(0)
