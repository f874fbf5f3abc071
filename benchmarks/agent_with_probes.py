"""``gpuattest`` with the probe scheduler wired into the agent daemon (RSS benchmark only).

``agent/cli.py`` does not pass a prober to :class:`~agent.daemon.AgentDaemon` yet (see
docs/benchmarks.md). Until it does, ``python -m benchmarks.agent_with_probes agent run ...``
runs the real CLI with one change: a daemon built without a prober gets the one
:func:`~agent.probes.scheduler.build_prober` makes from the environment's settings
(``GPUATTEST_AGENT_PROBES`` and friends). Once the CLI passes its own, nothing is replaced.
"""

from __future__ import annotations

from typing import Any

import agent.cli
from agent.daemon import AgentDaemon
from agent.probes.scheduler import ProbeScheduler, build_prober
from agent.settings import AgentSettings
from gpuattest.cli import main
from gpuattest.settings import load_settings


class ProbingDaemon(AgentDaemon):
    """An AgentDaemon that builds its prober from the environment when given none."""

    def __init__(self, *, prober: ProbeScheduler | None = None, **kwargs: Any) -> None:
        if prober is None:
            prober = build_prober(load_settings(AgentSettings), kwargs["collector"].source)
        super().__init__(prober=prober, **kwargs)


if __name__ == "__main__":
    agent.cli.AgentDaemon = ProbingDaemon  # type: ignore[attr-defined]  # the one substitution
    main()
