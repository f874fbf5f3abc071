"""The sampling daemon reading a fake NVML library instead of a GPU (RSS benchmark only).

The production daemon samples NVML; there is no GPU here. ``python -m
benchmarks.agent_on_fake_nvml CONFIG_JSON`` runs the real sampling daemon
(:func:`agent.sampler.main`, what ``gpuattest agent run`` execs into) with one
substitution: the ``pynvml`` module is the test suite's fake
(``tests/agent/collectors/fake_pynvml.py``: real pynvml structs, constants and error classes,
synthetic values) with eight H100s. The real nvidia-ml-py module is imported too (the fake
reads its constants), so its Python objects count; what ``libnvidia-ml.so`` itself would
hold on a GPU host does not.
"""

from __future__ import annotations

import sys

from agent.sampler import main
from tests.agent.collectors.fake_pynvml import FakeGpu, FakeNvml

GPUS = 8


def fake_h100_host(gpus: int = GPUS) -> FakeNvml:
    """A fake NVML with ``gpus`` busy H100s."""
    return FakeNvml(
        [
            FakeGpu(uuid=f"GPU-00000000-0000-4000-8000-{index:012d}", util_gpu=97)
            for index in range(gpus)
        ]
    )


if __name__ == "__main__":
    sys.modules["pynvml"] = fake_h100_host()  # type: ignore[assignment]  # the one substitution
    sys.exit(main())
