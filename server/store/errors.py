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


class EnrolmentRefused(GpuattestError):  # noqa: N818 - the name the service is written against
    """An enrolment was refused; nothing was changed and the token was not consumed."""

    def __init__(self, reason: EnrolmentRefusal) -> None:
        super().__init__(f"enrolment refused: {reason}")
        self.reason: EnrolmentRefusal = reason
