"""Read-side helpers for the CLI and the Results service."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, func, select

from server.records import WindowRow
from server.store.features import unpack_features
from server.store.schema import Agent, FeatureLayout, Gap, GpuWindow, Key

# The columns of a WindowRow that gpu_windows holds, and its layout's names (the query
# outer-joins feature_layouts on layout_id); the source comes from its envelope.
WINDOW_COLUMNS = (
    GpuWindow.agent_id,
    GpuWindow.sequence,
    GpuWindow.gpu_index,
    GpuWindow.gpu_uuid,
    GpuWindow.start_unix_ns,
    GpuWindow.end_unix_ns,
    GpuWindow.verdict,
    GpuWindow.confidence,
    GpuWindow.model_version,
    GpuWindow.features_json,
    GpuWindow.feature_values,
    FeatureLayout.names_json,
)


def window_row(row: Row[*tuple[Any, ...]]) -> WindowRow:
    """A :class:`WindowRow` from a row of :data:`WINDOW_COLUMNS` plus the envelope's source."""
    features = _stored_features(row)
    return WindowRow(
        agent_id=row.agent_id,
        sequence=row.sequence,
        gpu_index=row.gpu_index,
        gpu_uuid=row.gpu_uuid,
        start_unix_ns=row.start_unix_ns,
        end_unix_ns=row.end_unix_ns,
        verdict=row.verdict,
        confidence=row.confidence,
        model_version=row.model_version,
        source=row.source,
        features={str(name): float(value) for name, value in features.items()},
    )


def _stored_features(row: Row[*tuple[Any, ...]]) -> dict[str, Any]:
    if row.features_json is not None:  # stored before migration 0003
        stored: dict[str, Any] = json.loads(row.features_json)
        return stored
    if row.feature_values is None or row.names_json is None:
        raise ValueError(f"window {row.agent_id}/{row.sequence}/{row.gpu_index} has no features")
    return unpack_features(row.names_json, row.feature_values)


def current_keys(conn: Connection) -> dict[str, tuple[str, bool]]:
    """Per agent: (key_id, revoked) of the newest unrevoked key, else of the newest key."""
    query = select(Key.agent_id, Key.key_id, Key.revoked_at_unix_ns).order_by(
        Key.agent_id, Key.created_unix_ns, Key.key_id
    )
    current: dict[str, tuple[str, bool]] = {}
    for agent_id, key_id, revoked_at in conn.execute(query):
        revoked = revoked_at is not None
        held = current.get(agent_id)
        # Rows come oldest first: a later key replaces the held one unless it is revoked
        # and the held one is not.
        if held is None or not revoked or held[1]:
            current[agent_id] = (key_id, revoked)
    return current


def open_or_lost_gaps_by_agent(conn: Connection) -> dict[str, int]:
    """Gaps per agent that still mean missing evidence.

    A declared gap is evidence the agent lost for good. An observed gap (envelopes that
    arrived out of order) is filled once the chain has advanced past it, since the chain
    only advances through stored envelopes or a declared gap, so only those still ahead of
    the acknowledged sequence count.
    """
    query = (
        select(Gap.agent_id, func.count())
        .join(Agent, Agent.agent_id == Gap.agent_id)
        .where((Gap.kind == "declared") | (Gap.last_missing > Agent.acked_sequence))
        .group_by(Gap.agent_id)
    )
    return dict(conn.execute(query).all())
