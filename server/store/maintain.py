"""One maintenance pass over a store, from the command line (or cron, or a systemd timer).

    python -m server.store.maintain URL [--retention-days N] [--days-ahead D]

creates PostgreSQL's coming day partitions of gpu_windows and drops windows past retention
(see :mod:`server.store.retention`), then prints what changed as JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click

from server.store.retention import PARTITION_DAYS_AHEAD
from server.store.store import Store


@click.command()
@click.argument("url")
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    default=None,
    help="Drop windows that started before today minus this many days (default: keep all).",
)
@click.option(
    "--days-ahead",
    type=click.IntRange(min=0),
    default=PARTITION_DAYS_AHEAD,
    show_default=True,
    help="PostgreSQL: create day partitions this many days ahead.",
)
def main(url: str, retention_days: int | None, days_ahead: int) -> None:
    """Run one maintenance pass on the store at URL and print what it changed (JSON)."""
    with Store.open(url) as store:
        report = store.maintain_windows(time.time_ns(), retention_days, days_ahead)
    click.echo(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
