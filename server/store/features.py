"""GPU-window features as stored: packed float64 values plus the id of their names' layout.

Why not JSON: formatting 21-27 floats as text costs about 10 us a GPU window (the largest
single cost of storing an 8-GPU envelope) and takes ~1 KB a row. Here a window's values are
packed as little-endian float64 in the order of their names (8 bytes each, exact), and the
names are stored once per distinct list in ``feature_layouts``, under an id derived from the
names themselves, so every verifier replica computes the same id without asking anyone.
Rows stored before migration 0003 keep their ``features_json``; readers take either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

# Layouts remembered by a process (the names come from agents: bounded).
_MAX_CACHED_LAYOUTS = 1024


@dataclass(frozen=True)
class Layout:
    """A list of feature names, in order, and its id in ``feature_layouts``."""

    layout_id: int  # signed 64-bit, as the column holds it
    names_json: str  # JSON array of the names


def layout_of(features: Mapping[str, float]) -> Layout:
    """The layout of ``features``' names, in their order."""
    return _layout(tuple(features))


def pack_values(features: Mapping[str, float]) -> bytes:
    """The values of ``features`` in their order, as little-endian float64."""
    return _packer(len(features)).pack(*features.values())


def unpack_features(names_json: str, packed: bytes) -> dict[str, float]:
    """Name to value, from a layout's names and a window's packed values."""
    names = _names(names_json)
    if len(packed) != 8 * len(names):
        raise ValueError(f"{len(packed)} bytes of values for {len(names)} feature names")
    return dict(zip(names, _packer(len(names)).unpack(packed), strict=True))


@functools.lru_cache(maxsize=_MAX_CACHED_LAYOUTS)
def _layout(names: tuple[str, ...]) -> Layout:
    names_json = json.dumps(list(names), ensure_ascii=False)
    digest = hashlib.sha256(names_json.encode("utf-8")).digest()
    return Layout(int.from_bytes(digest[:8], "big", signed=True), names_json)


@functools.lru_cache(maxsize=_MAX_CACHED_LAYOUTS)
def _names(names_json: str) -> tuple[str, ...]:
    return tuple(str(name) for name in json.loads(names_json))


@functools.lru_cache(maxsize=256)
def _packer(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}d")
