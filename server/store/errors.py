"""Errors the evidence store raises on purpose."""

from __future__ import annotations

from typing import Literal, get_args

from proto.errors import GpuattestError

EnrolmentRefusal = Literal[
    "unknown_token", "token_used", "token_expired", "host_mismatch", "key_already_enrolled"
]
ENROLMENT_REFUSALS: tuple[EnrolmentRefusal, ...] = get_args(EnrolmentRefusal)


class StoreError(GpuattestError):
    """The store was asked for something its contents rule out (e.g. an unknown agent)."""


class StoreUnavailableError(GpuattestError):
    """The database could not be reached, or broke off the call; retry later, with backoff.

    Raised when the server is down or restarting, the connection dropped, or the database
    gave up on the transaction (a deadlock, a serialisation failure, SQLite still locked
    after its busy timeout). The call's transaction did not commit, except when the
    connection broke during the commit itself, when it may have: every evidence write is
    idempotent, so retrying the same call is safe. Deliberately not a :class:`StoreError`,
    which means the request itself is wrong and retrying it cannot help.
    """


class EnrolmentRefused(GpuattestError):  # noqa: N818 - the name the service is written against
    """An enrolment was refused; nothing was changed and the token was not consumed."""

    def __init__(self, reason: EnrolmentRefusal) -> None:
        super().__init__(f"enrolment refused: {reason}")
        self.reason: EnrolmentRefusal = reason
