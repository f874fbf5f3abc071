"""What the prober hands the daemon at each sealed window (no pydantic, no torch here).

The daemon imports this even when probes are off; the scheduler, which validates the probe
worker's reports with pydantic, is imported only when probes are on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proto.evidence_pb2 import ProbeResult


@dataclass(frozen=True)
class ProbeBatch:
    """Probe output gathered since the last sealed window."""

    results: tuple[ProbeResult, ...] = ()
    features: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
