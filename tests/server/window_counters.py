"""Check each agent's ``windows_stored`` counter against a real COUNT of its windows."""

from __future__ import annotations

from sqlalchemy import create_engine, text

# Each agent's counter beside a real count of its windows.
_COUNTER_AND_COUNT = (
    "SELECT a.agent_id, a.windows_stored, "
    "(SELECT count(*) FROM gpu_windows w WHERE w.agent_id = a.agent_id) "
    "FROM agents a ORDER BY a.agent_id"
)


def windows_counted(url: str) -> dict[str, int]:
    """Each agent's windows_stored, after asserting it equals a COUNT of its windows."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = [tuple(row) for row in conn.execute(text(_COUNTER_AND_COUNT))]
    finally:
        engine.dispose()
    assert [(agent, counter) for agent, counter, _ in rows] == [
        (agent, count) for agent, _, count in rows
    ]
    return {str(agent): int(counter) for agent, counter, _ in rows}
