"""Evidence-chain steps, run inside the caller's write transaction."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, bindparam, case, insert, select, text, tuple_, update
from sqlalchemy.exc import DBAPIError

from server.records import AcceptedEnvelope, GapRecord
from server.store.errors import StoreError
from server.store.features import Layout, layout_of, pack_values
from server.store.schema import (
    GAP_KINDS,
    Agent,
    Envelope,
    FeatureLayout,
    Gap,
    GpuWindow,
    Nonce,
    Process,
)

_Row = dict[str, Any]


def store_fresh(conn: Connection, accepted: Sequence[AcceptedEnvelope]) -> int:
    """Store the envelopes of ``accepted`` not stored yet, with everything hanging off them.

    Returns how many were new. See :meth:`server.store.Store.store_accepted`.
    """
    fresh = _not_yet_stored(conn, accepted)
    if not fresh:
        return 0
    require_agents(conn, {envelope.agent_id for envelope in fresh})
    _insert_rows(conn, Envelope, [_envelope_row(envelope) for envelope in fresh])
    _store_layouts(conn, {layout_of(gpu.features) for e in fresh for gpu in e.gpus})
    # Windows and processes hang off envelopes just inserted: they cannot race another
    # writer, so PostgreSQL may take them by COPY, the bulk of the rows. For the same
    # reason every window row sent is a row inserted, which the agents' counters add up.
    windows = [row for e in fresh for row in _window_rows(e)]
    _bulk_rows(conn, GpuWindow, windows)
    _bulk_rows(conn, Process, [row for e in fresh for row in _process_rows(e)])
    insert_new_gaps(conn, [gap for gap in map(declared_gap, fresh) if gap is not None])
    _burn_nonces(conn, fresh)
    _advance_agents(conn, fresh, Counter(row["agent_id"] for row in windows))
    return len(fresh)


def _not_yet_stored(
    conn: Connection, accepted: Sequence[AcceptedEnvelope]
) -> list[AcceptedEnvelope]:
    wanted = {(envelope.agent_id, envelope.sequence) for envelope in accepted}
    # One query for the whole batch, however many agents it spans (a commit group of the
    # ingest path holds hundreds); row-value IN works on SQLite >= 3.15 and PostgreSQL.
    stored = conn.execute(
        select(Envelope.agent_id, Envelope.sequence).where(
            tuple_(Envelope.agent_id, Envelope.sequence).in_(sorted(wanted))
        )
    )
    seen: set[tuple[str, int]] = {(row.agent_id, row.sequence) for row in stored}
    fresh = []
    for envelope in accepted:
        key = (envelope.agent_id, envelope.sequence)
        if key not in seen:
            seen.add(key)
            fresh.append(envelope)
    return fresh


def _store_layouts(conn: Connection, layouts: set[Layout]) -> None:
    """Store the feature layouts not stored yet; refuse an id stored with other names."""
    if not layouts:
        return
    wanted = {layout.layout_id: layout.names_json for layout in layouts}
    query = select(FeatureLayout.layout_id, FeatureLayout.names_json).where(
        FeatureLayout.layout_id.in_(wanted)
    )
    stored: dict[int, str] = {row.layout_id: row.names_json for row in conn.execute(query)}
    for layout_id, names_json in stored.items():
        if names_json != wanted[layout_id]:
            # 64 bits of SHA-256 of the names: never by chance, so say so loudly.
            raise StoreError(f"feature layout {layout_id} is stored with other names")
    missing = [
        {"layout_id": layout_id, "names_json": names_json}
        for layout_id, names_json in sorted(wanted.items())
        if layout_id not in stored
    ]
    if missing:
        # Another replica may be storing the same layout right now: same id, same names.
        conn.execute(_INSERT_LAYOUT, missing)


_INSERT_LAYOUT = text(
    "INSERT INTO feature_layouts (layout_id, names_json) VALUES (:layout_id, :names_json) "
    "ON CONFLICT (layout_id) DO NOTHING"
)


def require_agents(conn: Connection, agent_ids: Iterable[str]) -> None:
    """Raise :class:`StoreError` naming any of ``agent_ids`` that was never enrolled."""
    wanted = set(agent_ids)
    known = set(conn.execute(select(Agent.agent_id).where(Agent.agent_id.in_(wanted))).scalars())
    missing = wanted - known
    if missing:
        raise StoreError(f"agents never enrolled: {', '.join(sorted(missing))}")


def _insert_rows(
    conn: Connection, model: type[Envelope | GpuWindow | Process], rows: list[_Row]
) -> None:
    if not rows:
        return
    sql = _driver_insert(conn.dialect.paramstyle, model.__tablename__, tuple(rows[0]))
    if sql is None:
        conn.execute(insert(model), rows)
        return
    # Straight to the driver's executemany: SQLAlchemy's per-row parameter processing
    # costs more than the insert itself (3 us a row on SQLite, 15 on psycopg), and these
    # columns need none (ints, floats, text, bytes, bools). Errors still go through
    # SQLAlchemy, so IntegrityError and the store's unavailability mapping hold.
    conn.exec_driver_sql(sql, rows)


def _bulk_rows(conn: Connection, model: type[GpuWindow | Process], rows: list[_Row]) -> None:
    driver = conn.connection.driver_connection
    if not rows or not isinstance(driver, psycopg.Connection):
        _insert_rows(conn, model, rows)
        return
    # COPY costs psycopg about 3.5 us a row against 20 for a pipelined executemany.
    columns = tuple(rows[0])
    statement = _copy_statement(model.__tablename__, columns)
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[column] for column in columns])
    except psycopg.Error as error:
        # The same exception classes SQLAlchemy raises for the other statements.
        raise DBAPIError.instance(statement, None, error, psycopg.Error) from error


@functools.cache
def _copy_statement(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{column}"' for column in columns)
    return f'COPY "{table}" ({names}) FROM STDIN'


@functools.cache
def _driver_insert(paramstyle: str, table: str, columns: tuple[str, ...]) -> str | None:
    """INSERT with named parameters in the driver's own style; None if it has none.

    Names are the schema's own, double-quoted as SQLite and PostgreSQL both read them.
    """
    placeholder = _NAMED_PLACEHOLDERS.get(paramstyle)
    if placeholder is None:
        return None
    names = ", ".join(f'"{column}"' for column in columns)
    values = ", ".join(placeholder.format(column) for column in columns)
    return f'INSERT INTO "{table}" ({names}) VALUES ({values})'  # noqa: S608 - our names


# Placeholders taking a mapping, by DB-API paramstyle (sqlite3 accepts named with qmark).
_NAMED_PLACEHOLDERS = {"qmark": ":{}", "named": ":{}", "pyformat": "%({})s"}


def insert_new_gaps(conn: Connection, gaps: Sequence[GapRecord]) -> None:
    """Insert the gaps not stored yet (one per agent, first, last and kind)."""
    seen: set[tuple[str, int, int, str]] = set()
    rows = []
    for gap in gaps:
        key = (gap.agent_id, gap.first_missing, gap.last_missing, gap.kind)
        if key in seen or _gap_stored(conn, gap):
            continue
        seen.add(key)
        rows.append(
            {
                "agent_id": gap.agent_id,
                "first_missing": gap.first_missing,
                "last_missing": gap.last_missing,
                "kind": gap.kind,
                "detected_unix_ns": gap.detected_unix_ns,
            }
        )
    if rows:
        conn.execute(insert(Gap), rows)


def _gap_stored(conn: Connection, gap: GapRecord) -> bool:
    query = select(Gap.id).where(
        Gap.agent_id == gap.agent_id,
        Gap.first_missing == gap.first_missing,
        Gap.last_missing == gap.last_missing,
        Gap.kind == gap.kind,
    )
    return conn.execute(query).first() is not None


def _burn_nonces(conn: Connection, envelopes: Iterable[AcceptedEnvelope]) -> None:
    for envelope in envelopes:
        if envelope.nonce:
            conn.execute(
                update(Nonce)
                .where(Nonce.nonce == envelope.nonce, Nonce.used_at_unix_ns.is_(None))
                .values(used_at_unix_ns=envelope.received_unix_ns)
            )


def _advance_agents(
    conn: Connection, envelopes: Iterable[AcceptedEnvelope], windows_added: Mapping[str, int]
) -> None:
    newest: dict[str, AcceptedEnvelope] = {}
    last_received: dict[str, int] = {}
    for envelope in envelopes:
        agent_id = envelope.agent_id
        if agent_id not in newest or envelope.sequence > newest[agent_id].sequence:
            newest[agent_id] = envelope
        last_received[agent_id] = max(last_received.get(agent_id, 0), envelope.received_unix_ns)
    # One statement per agent, in one executemany. By agent id, so two replicas storing
    # batches of the same agents lock those rows in one order, never crosswise.
    conn.execute(
        _ADVANCE_AGENT,
        [
            {
                "b_agent": agent_id,
                "b_sequence": newest[agent_id].sequence,
                "b_head": newest[agent_id].chain_head_sha256,
                "b_now": last_received[agent_id],
                "b_windows": windows_added.get(agent_id, 0),
            }
            for agent_id in sorted(newest)
        ],
    )


# The chain head only moves to a higher sequence, so a late, lower one never moves it
# backwards; last seen never moves backwards either. Every SET reads the row as it was.
_CHAIN_BEHIND = Agent.acked_sequence < bindparam("b_sequence")
_ADVANCE_AGENT = (
    update(Agent)
    .where(Agent.agent_id == bindparam("b_agent"))
    .values(
        acked_sequence=case((_CHAIN_BEHIND, bindparam("b_sequence")), else_=Agent.acked_sequence),
        last_envelope_sha256=case(
            (_CHAIN_BEHIND, bindparam("b_head")), else_=Agent.last_envelope_sha256
        ),
        last_seen_unix_ns=case(
            (Agent.last_seen_unix_ns < bindparam("b_now"), bindparam("b_now")),
            else_=Agent.last_seen_unix_ns,
        ),
        windows_stored=Agent.windows_stored + bindparam("b_windows"),
    )
)
# Alone (a call that stores nothing): last seen never moves backwards.
_TOUCH = (
    update(Agent)
    .where(Agent.agent_id == bindparam("b_agent"), Agent.last_seen_unix_ns < bindparam("b_now"))
    .values(last_seen_unix_ns=bindparam("b_now"))
)


def touch(conn: Connection, agent_id: str, now_unix_ns: int) -> None:
    """Move the agent's last-seen time forward to ``now_unix_ns`` (never backwards)."""
    conn.execute(_TOUCH, {"b_agent": agent_id, "b_now": now_unix_ns})


def declared_gap(envelope: AcceptedEnvelope) -> GapRecord | None:
    """The "declared" gap a gap notice puts on record, or None for ordinary evidence."""
    if envelope.declared_gap is None:
        return None
    first_missing, last_missing = envelope.declared_gap
    return GapRecord(
        envelope.agent_id, first_missing, last_missing, "declared", envelope.received_unix_ns
    )


def check_gap(gap: GapRecord) -> None:
    """Raise ValueError unless the gap has a known kind and a range 1 <= first <= last."""
    if gap.kind not in GAP_KINDS:
        raise ValueError(f"gap kind must be one of {GAP_KINDS}, not {gap.kind!r}")
    if not 1 <= gap.first_missing <= gap.last_missing:
        raise ValueError(
            f"gap range {gap.first_missing}..{gap.last_missing} is not 1 <= first <= last"
        )


def _envelope_row(envelope: AcceptedEnvelope) -> _Row:
    return {
        "agent_id": envelope.agent_id,
        "sequence": envelope.sequence,
        "sha256": envelope.envelope_sha256,
        "payload_type": envelope.payload_type,
        "envelope": envelope.envelope,
        "received_unix_ns": envelope.received_unix_ns,
        "window_start_unix_ns": envelope.window_start_unix_ns,
        "window_end_unix_ns": envelope.window_end_unix_ns,
        "source": envelope.source,
        "nonce": envelope.nonce,
    }


def _window_rows(envelope: AcceptedEnvelope) -> list[_Row]:
    return [
        {
            "agent_id": envelope.agent_id,
            "sequence": envelope.sequence,
            "gpu_index": gpu.gpu_index,
            "gpu_uuid": gpu.gpu_uuid,
            "start_unix_ns": gpu.start_unix_ns,
            "end_unix_ns": gpu.end_unix_ns,
            "sample_count": gpu.sample_count,
            "verdict": gpu.verdict,
            "confidence": gpu.confidence,
            "model_version": gpu.model_version,
            # Packed, not JSON: formatting the floats as text cost more than storing them.
            "layout_id": layout_of(gpu.features).layout_id,
            "feature_values": pack_values(gpu.features),
        }
        for gpu in envelope.gpus
    ]


def _process_rows(envelope: AcceptedEnvelope) -> list[_Row]:
    return [
        {
            "agent_id": envelope.agent_id,
            "sequence": envelope.sequence,
            "process_index": position,
            "gpu_index": process.gpu_index,
            "pid": process.pid,
            "used_memory_mib": process.used_memory_mib,
            "job_kind": process.job_kind,
            "job_id": process.job_id,
            "trusted": process.trusted,
        }
        for position, process in enumerate(envelope.processes)
    ]
