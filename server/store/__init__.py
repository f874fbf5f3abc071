"""The verifier's evidence store (SQLAlchemy; SQLite by default, or PostgreSQL)."""

from server.store.errors import (
    ENROLMENT_REFUSALS,
    EnrolmentRefusal,
    EnrolmentRefused,
    StoreError,
    StoreUnavailableError,
)
from server.store.store import Store

__all__ = [
    "ENROLMENT_REFUSALS",
    "EnrolmentRefusal",
    "EnrolmentRefused",
    "Store",
    "StoreError",
    "StoreUnavailableError",
]
