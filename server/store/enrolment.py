"""Enrolment steps, run inside the caller's write transaction."""

from __future__ import annotations

from sqlalchemy import Connection, insert, or_, select, update

from proto.envelope import GENESIS_HASH
from server.store.errors import EnrolmentRefusal, EnrolmentRefused
from server.store.schema import Agent, EnrolToken


def consume_token(
    conn: Connection, token_sha256: bytes, hostname: str, agent_id: str, now_unix_ns: int
) -> None:
    """Mark the token used by ``agent_id``, or raise :class:`EnrolmentRefused` saying why not."""
    # A single conditional UPDATE: of two concurrent callers only one can match the row.
    consumed = conn.execute(
        update(EnrolToken)
        .where(
            EnrolToken.token_sha256 == token_sha256,
            EnrolToken.used_at_unix_ns.is_(None),
            EnrolToken.expires_unix_ns > now_unix_ns,
            or_(EnrolToken.hostname == "", EnrolToken.hostname == hostname),
        )
        .values(used_at_unix_ns=now_unix_ns, used_by_agent=agent_id)
    )
    if consumed.rowcount != 1:
        raise EnrolmentRefused(_why_token_refused(conn, token_sha256, now_unix_ns))


def _why_token_refused(conn: Connection, token_sha256: bytes, now_unix_ns: int) -> EnrolmentRefusal:
    query = select(EnrolToken.used_at_unix_ns, EnrolToken.expires_unix_ns).where(
        EnrolToken.token_sha256 == token_sha256
    )
    token = conn.execute(query).first()
    if token is None:
        return "unknown_token"
    if token.used_at_unix_ns is not None:
        return "token_used"
    if token.expires_unix_ns <= now_unix_ns:
        return "token_expired"
    return "host_mismatch"


def ensure_agent(conn: Connection, agent_id: str, hostname: str, now_unix_ns: int) -> None:
    """Insert the agent at the start of its chain, unless it is already enrolled on ``hostname``.

    Raises :class:`EnrolmentRefused` ("host_mismatch") if it is enrolled on another host.
    """
    enrolled_on = conn.execute(
        select(Agent.hostname).where(Agent.agent_id == agent_id)
    ).scalar_one_or_none()
    if enrolled_on is None:
        agent_row = {
            "agent_id": agent_id,
            "hostname": hostname,
            "enrolled_unix_ns": now_unix_ns,
            "acked_sequence": 0,
            "last_envelope_sha256": GENESIS_HASH,
            "last_seen_unix_ns": 0,
        }
        conn.execute(insert(Agent), [agent_row])
    elif enrolled_on != hostname:
        # A key enrolled from another host must never speak for this agent.
        raise EnrolmentRefused("host_mismatch")
