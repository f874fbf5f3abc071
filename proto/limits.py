"""Hard size limits of the wire contract, shared by agent and verifier.

Both sides enforce the same numbers: the agent never signs what the verifier would refuse,
and the verifier refuses anything larger before it spends work on it.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds on messages; exceeding one is RESOURCE_EXHAUSTED at the verifier."""

    max_envelope_bytes: int = 256 * KIB
    max_envelopes_per_batch: int = 64
    max_gpus_per_window: int = 64  # 8 GPUs x 7 MIG slices = 56, plus headroom
    max_features_per_gpu: int = 128
    max_processes: int = 1024
    max_probes: int = 256
    max_string_bytes: int = 256
    max_window_seconds: float = 10.0
    # Slack for the last sample of a window landing just past the nominal end.
    window_tolerance_seconds: float = 0.5

    @property
    def max_request_bytes(self) -> int:
        """Largest gRPC request a full batch can need, with room for framing."""
        return self.max_envelope_bytes * self.max_envelopes_per_batch + 64 * KIB


DEFAULT_LIMITS = WireLimits()
