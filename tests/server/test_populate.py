"""The synthetic bulk loader and query timer, on a tiny fleet (the 10M figure is in docs)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import create_engine, text

from server.store.populate import main
from tests.server.window_counters import windows_counted

QUERIES = 5


def _scalar(url: str, query: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            value: int = conn.execute(text(query)).scalar_one()
            return value
    finally:
        engine.dispose()


def test_populate_fills_the_day_partitions_and_times_the_queries(postgres_url: str) -> None:
    arguments = ["--windows", "170", "--agents", "2", "--gpus-per-agent", "4"]
    arguments += ["--interval-s", "900", "--repeat", "1", postgres_url]

    outcome = CliRunner().invoke(main, arguments)

    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    # 170 windows round down to whole envelopes: 2 agents x 4 GPUs x 21 sequences.
    assert report["populate"]["windows"] == 168
    assert report["sizes"]["gpu_windows_rows"] == 168
    assert _scalar(postgres_url, "SELECT count(*) FROM envelopes") == 42
    assert _scalar(postgres_url, "SELECT count(*) FROM gpu_windows_default") == 0
    # Each agent's counter (what `verifier agents` reads) matches its rows.
    assert sum(windows_counted(postgres_url).values()) == 168
    assert len(report["queries"]) == QUERIES
    summary = next(q for q in report["queries"] if q["query"].startswith("per-agent summary"))
    assert summary["rows"] == 2
    assert all(q["median_ms"] >= 0 for q in report["queries"])


def test_populate_refuses_sqlite(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(main, ["--windows", "8", f"sqlite:///{tmp_path / 'e.db'}"])

    assert outcome.exit_code == 2
    assert "postgresql" in outcome.output
