"""Fill a PostgreSQL evidence store with synthetic windows, and time the compliance queries.

    python -m server.store.populate --windows 10000000 postgresql://postgres@127.0.0.1:5432/db

generates ``--agents`` enrolled agents with ``--gpus-per-agent`` GPUs each, every agent
sending one envelope every ``--interval-s`` seconds up to now, until ``--windows`` GPU
windows are stored (rounded down to whole envelopes). Rows are made inside the server with
``INSERT ... SELECT generate_series`` (nothing crosses the socket), one transaction per
group of agents, into day partitions created beforehand. The rows are synthetic (random
verdicts and feature values, short envelope bytes, no processes) and are only good for
sizing and timing; never point this at a real store.

With ``--measure`` (the default) it then times the queries the compliance CLI and the
Results service make, each run ``--repeat`` times through :class:`server.store.Store`, and
prints one JSON object. ``--windows 0`` only measures what is already stored.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click
from sqlalchemy import Connection, Engine, text

from server.store.engine import create_store_engine, database_url
from server.store.retention import DAY_NS, create_window_partitions, day_start
from server.store.store import Store

NS_PER_S = 1_000_000_000
AGENT_PREFIX = "populate-agent-"
# Agents per transaction: big enough to amortise, small enough to show progress.
AGENTS_PER_CHUNK = 10
# Twenty plain-NVML features with plausible magnitudes, as the agent would sign them.
_FEATURES = (
    ("busy_frac", "random()"),
    ("coverage_frac", "1.0"),
    ("energy_j", "2000 + 1000 * random()"),
    ("idle_frac", "random() / 4"),
    ("mem_used_mean_mib", "40000 + 30000 * random()"),
    ("mem_used_slope_mib_per_s", "random() - 0.5"),
    ("power_dominant_period_s", "0.5 + 3 * random()"),
    ("power_frac_of_limit", "random()"),
    ("power_max_w", "300 + 400 * random()"),
    ("power_mean_w", "100 + 500 * random()"),
    ("power_p90_w", "200 + 450 * random()"),
    ("power_periodicity", "random()"),
    ("power_rel_spread_frac", "random() / 2"),
    ("power_std_w", "80 * random()"),
    ("sample_count", "100"),
    ("sm_clock_mean_mhz", "1410 + 570 * random()"),
    ("util_gpu_mean_pct", "100 * random()"),
    ("util_gpu_p90_pct", "100 * random()"),
    ("util_gpu_std_pct", "30 * random()"),
    ("util_mem_mean_pct", "60 * random()"),
)


@dataclass(frozen=True)
class Shape:
    """How the synthetic fleet looks."""

    agents: int
    gpus_per_agent: int
    sequences: int  # envelopes per agent
    interval_ns: int
    end_unix_ns: int  # the last window starts just before this

    @property
    def first_start(self) -> int:
        return self.end_unix_ns - self.sequences * self.interval_ns

    @property
    def windows(self) -> int:
        return self.agents * self.gpus_per_agent * self.sequences


@dataclass(frozen=True)
class Timing:
    """One query, timed over several runs."""

    query: str
    rows: int
    median_ms: float
    min_ms: float
    max_ms: float


def agent_id(number: int) -> str:
    """The id of synthetic agent ``number`` (1-based), zero-padded so ids sort numerically."""
    return f"{AGENT_PREFIX}{number:06d}"


def populate(engine: Engine, shape: Shape, progress: Callable[[str], None]) -> None:
    """Insert the agents, keys, envelopes and windows of ``shape`` (PostgreSQL only)."""
    days = range(day_start(shape.first_start), shape.end_unix_ns, DAY_NS)
    create_window_partitions(engine, list(days))
    for first in range(1, shape.agents + 1, AGENTS_PER_CHUNK):
        last = min(first + AGENTS_PER_CHUNK - 1, shape.agents)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            _insert_chunk(conn, shape, first, last)
        progress(f"agents {first}..{last} of {shape.agents}: {time.perf_counter() - started:.1f} s")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        started = time.perf_counter()
        conn.exec_driver_sql("VACUUM (ANALYZE) agents, keys, envelopes, gpu_windows")
        progress(f"vacuum analyze: {time.perf_counter() - started:.1f} s")


def _insert_chunk(conn: Connection, shape: Shape, first: int, last: int) -> None:
    # The f-strings below only splice in this module's own SQL fragments; values are bound.
    bounds: dict[str, Any] = {
        "first": first,
        "last": last,
        "sequences": shape.sequences,
        "gpus": shape.gpus_per_agent,
        "start": shape.first_start,
        "interval": shape.interval_ns,
        "prefix": AGENT_PREFIX,
    }
    agent = "(:prefix || lpad(a::text, 6, '0'))"
    # Every agent gets all its windows below, so its counter is known up front.
    conn.execute(
        text(
            "INSERT INTO agents (agent_id, hostname, enrolled_unix_ns, acked_sequence, "  # noqa: S608
            "last_envelope_sha256, last_seen_unix_ns, windows_stored) "
            f"SELECT {agent}, 'populate-host-' || a, :start, :sequences, "
            "sha256(a::text::bytea), :start + :sequences * :interval, :sequences * :gpus "
            "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) a"
        ),
        bounds,
    )
    conn.execute(
        text(
            f"INSERT INTO keys SELECT 'populate-key-' || a, {agent}, sha256(a::text::bytea), "  # noqa: S608
            ":start, NULL FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) a"
        ),
        bounds,
    )
    window_start = "(:start + (s - 1) * :interval)"
    conn.execute(
        text(
            f"INSERT INTO envelopes SELECT {agent}, s, sha256((a || '/' || s)::bytea), "  # noqa: S608
            "'application/vnd.gpuattest.evidence.v1+protobuf', "
            "decode(repeat(md5(a || '/' || s), 8), 'hex'), "
            f"{window_start} + :interval, {window_start}, {window_start} + 10000000000, "
            "'synthetic-populate', ''::bytea "
            "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) a, "
            "generate_series(1, CAST(:sequences AS bigint)) s"
        ),
        bounds,
    )
    conn.execute(
        text(
            f"INSERT INTO gpu_windows SELECT {agent}, s, g, 'GPU-populate-' || a || '-' || g, "  # noqa: S608
            f"{window_start}, {window_start} + 10000000000, 100, "
            "(ARRAY['training', 'inference', 'idle'])[1 + floor(random() * 3)::int], "
            f"random(), 'populate-1', {_features_json()} "
            "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) a, "
            "generate_series(1, CAST(:sequences AS bigint)) s, "
            "generate_series(0, CAST(:gpus AS bigint) - 1) g"
        ),
        bounds,
    )


def _features_json() -> str:
    # Built as text in SQL, sorted by name like the verifier's json.dumps(sort_keys=True).
    members = ", ".join(
        f"'\"{name}\": ' || round(({value})::numeric, 6)" for name, value in _FEATURES
    )
    return f"'{{' || concat_ws(', ', {members}) || '}}'"


def measure(store: Store, engine: Engine, repeat: int) -> list[Timing]:
    """Time the compliance queries on what is stored, around the middle agent and day."""
    with engine.connect() as conn:
        oldest, newest = conn.execute(
            text("SELECT min(start_unix_ns), max(start_unix_ns) FROM gpu_windows")
        ).one()
        agents = conn.execute(text("SELECT count(*) FROM agents")).scalar_one()
    if newest is None:
        raise click.UsageError("no windows stored: nothing to measure")
    agent = agent_id(max(1, agents // 2))
    middle = (oldest + newest) // 2
    hour = 3600 * NS_PER_S
    queries: dict[str, Callable[[], int]] = {
        "one agent, one hour mid-history (list_windows agent, since, until)": lambda: len(
            store.list_windows(agent, middle, limit=100_000, until_unix_ns=middle + hour)
        ),
        "one agent, latest hour (list_windows agent, since)": lambda: len(
            store.list_windows(agent, newest - hour, limit=100_000)
        ),
        "fleet, latest 5 minutes, first 1000 (list_windows since)": lambda: len(
            store.list_windows(None, newest - 300 * NS_PER_S, limit=1000)
        ),
        "per-agent summary (list_agents: gpuattest verifier agents)": lambda: len(
            store.list_agents()
        ),
        "one agent, windows by verdict over one day (SQL)": lambda: _verdicts_of_day(
            engine, agent, day_start(middle)
        ),
    }
    return [_time(name, run, repeat) for name, run in queries.items()]


def _verdicts_of_day(engine: Engine, agent: str, day: int) -> int:
    query = text(
        "SELECT verdict, count(*) FROM gpu_windows WHERE agent_id = :agent "
        "AND start_unix_ns >= :low AND start_unix_ns < :high GROUP BY verdict"
    )
    with engine.connect() as conn:
        rows = conn.execute(query, {"agent": agent, "low": day, "high": day + DAY_NS}).all()
    return sum(int(count) for _verdict, count in rows)


def _time(name: str, run: Callable[[], int], repeat: int) -> Timing:
    rows = run()  # warm-up: the first run reads from disk into the cache
    elapsed = []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = run()
        elapsed.append((time.perf_counter() - started) * 1000)
    return Timing(
        query=name,
        rows=rows,
        median_ms=round(statistics.median(elapsed), 2),
        min_ms=round(min(elapsed), 2),
        max_ms=round(max(elapsed), 2),
    )


def _stderr(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@click.argument("url")
@click.option("--windows", type=click.IntRange(min=0), default=10_000_000, show_default=True)
@click.option("--agents", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--gpus-per-agent", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--interval-s", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--measure/--no-measure", "run_measure", default=True, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
def main(
    url: str,
    windows: int,
    agents: int,
    gpus_per_agent: int,
    interval_s: int,
    run_measure: bool,
    repeat: int,
) -> None:
    """Populate the PostgreSQL store at URL with synthetic windows, then time the queries."""
    if database_url(url).get_backend_name() != "postgresql":
        raise click.UsageError("populate generates rows inside PostgreSQL; give a postgresql URL")
    report: dict[str, Any] = {}
    with Store.open(url) as store:
        engine = create_store_engine(url)
        try:
            if windows:
                shape = Shape(
                    agents=agents,
                    gpus_per_agent=gpus_per_agent,
                    sequences=windows // (agents * gpus_per_agent),
                    interval_ns=interval_s * NS_PER_S,
                    end_unix_ns=time.time_ns(),
                )
                started = time.perf_counter()
                populate(engine, shape, _stderr)
                report["populate"] = {
                    **asdict(shape),
                    "windows": shape.windows,
                    "seconds": round(time.perf_counter() - started, 1),
                }
            if run_measure:
                report["queries"] = [asdict(t) for t in measure(store, engine, repeat)]
            report["sizes"] = _sizes(engine)
        finally:
            engine.dispose()
    json.dump(report, sys.stdout, indent=2)
    click.echo()


def _sizes(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        windows = conn.execute(text("SELECT count(*) FROM gpu_windows")).scalar_one()
        size = conn.execute(
            text(
                "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) "
                "FROM pg_inherits WHERE inhparent = 'gpu_windows'::regclass"
            )
        ).scalar_one()
        database = conn.execute(
            text("SELECT pg_size_pretty(pg_database_size(current_database()))")
        ).scalar_one()
    return {"gpu_windows_rows": windows, "gpu_windows_size": size, "database_size": database}


if __name__ == "__main__":
    main()
