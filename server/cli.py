"""`gpuattest verifier ...`: serve, enrol, revoke, and answer compliance questions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gpuattest.settings import load_settings
from server.serve import serve_forever
from server.settings import VerifierSettings
from server.store import Store

NS_PER_S = 1_000_000_000
config_option = click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML settings file"
)
db_option = click.option("--db", "db_url", help="database URL (default: settings' db_url)")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")


def _settings(config: Path | None, **flags: object) -> VerifierSettings:
    return load_settings(VerifierSettings, config, flags)


def _format_ns(unix_ns: int) -> str:
    if not unix_ns:
        return "-"
    return datetime.fromtimestamp(unix_ns / NS_PER_S, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    Console(width=200).print(table)


def _print_json(rows: list[dict[str, Any]]) -> None:
    click.echo(json.dumps(rows, indent=2, default=lambda b: b.hex() if isinstance(b, bytes) else b))


@click.group("verifier")
def verifier() -> None:
    """The verifier service and its operator commands."""


@verifier.command()
@config_option
@click.option("--listen", help="host:port to serve on")
@db_option
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--tls-client-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="require agent certificates signed by this CA (mutual TLS)",
)
@click.option(
    "--insecure-plaintext", is_flag=True, default=None, help="no TLS; loopback addresses only"
)
def serve(config: Path | None, **flags: object) -> None:
    """Serve gRPC until SIGINT/SIGTERM."""
    settings = _settings(config, **flags)
    store = Store.open(settings.db_url)
    try:
        asyncio.run(serve_forever(settings, store))
    finally:
        store.close()


@verifier.command("enroll-token")
@config_option
@db_option
@click.option("--host", "hostname", default="", help="bind the token to this agent host name")
@click.option("--ttl", "ttl_s", type=float, help="seconds the token stays valid")
def enroll_token(
    config: Path | None, db_url: str | None, hostname: str, ttl_s: float | None
) -> None:
    """Create a one-time enrolment token and print it (it is stored only as a hash)."""
    settings = _settings(config, db_url=db_url, enrol_token_ttl_s=ttl_s)
    token = secrets.token_urlsafe(32)
    now = time.time_ns()
    store = Store.open(settings.db_url)
    try:
        store.add_enrol_token(
            hashlib.sha256(token.encode()).digest(),
            hostname,
            now + int(settings.enrol_token_ttl_s * NS_PER_S),
            now,
        )
    finally:
        store.close()
    click.echo(token)


@verifier.command()
@config_option
@db_option
@click.argument("key_id")
def revoke(config: Path | None, db_url: str | None, key_id: str) -> None:
    """Revoke an agent key: its evidence is refused from now on."""
    store = Store.open(_settings(config, db_url=db_url).db_url)
    try:
        if not store.revoke_key(key_id, time.time_ns()):
            raise click.ClickException(f"no key {key_id}")
    finally:
        store.close()
    click.echo(f"revoked {key_id}")


@verifier.command()
@config_option
@db_option
@json_option
def agents(config: Path | None, db_url: str | None, as_json: bool) -> None:
    """Per agent: id, host, last sequence, windows stored, gaps, last seen."""
    store = Store.open(_settings(config, db_url=db_url).db_url)
    try:
        summaries = store.list_agents()
    finally:
        store.close()
    if as_json:
        _print_json([asdict(summary) for summary in summaries])
        return
    _print_table(
        "agents",
        ("agent", "host", "last seq", "windows", "gaps", "revoked", "last seen (UTC)"),
        [
            (
                a.agent_id,
                a.hostname,
                a.acked_sequence,
                a.windows_stored,
                a.gaps,
                a.revoked,
                _format_ns(a.last_seen_unix_ns),
            )
            for a in summaries
        ],
    )


@verifier.command()
@config_option
@db_option
@json_option
@click.option("--agent", "agent_id", help="only this agent")
@click.option("--limit", type=int, default=1000, show_default=True)
def windows(
    config: Path | None, db_url: str | None, as_json: bool, agent_id: str | None, limit: int
) -> None:
    """Per GPU window: agent, GPU, start, end, verdict, confidence."""
    store = Store.open(_settings(config, db_url=db_url).db_url)
    try:
        rows = store.list_windows(agent_id, 0, limit)
    finally:
        store.close()
    if as_json:
        _print_json([asdict(row) for row in rows])
        return
    _print_table(
        "GPU windows",
        ("agent", "seq", "gpu", "start (UTC)", "end (UTC)", "verdict", "confidence", "model"),
        [
            (
                r.agent_id,
                r.sequence,
                r.gpu_index,
                _format_ns(r.start_unix_ns),
                _format_ns(r.end_unix_ns),
                r.verdict,
                f"{r.confidence:.2f}",
                r.model_version,
            )
            for r in rows
        ],
    )
