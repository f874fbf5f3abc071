"""Benchmarks run on whatever device is here; each records which one in its extra info."""

from __future__ import annotations

import platform

import pytest


@pytest.fixture
def device_info() -> dict[str, str]:
    """What the figures were measured on (no GPU paths yet: this suite measures CPU work)."""
    return {"device": "cpu", "cpu": platform.processor() or platform.machine()}
