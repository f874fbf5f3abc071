"""The verifier's settings: one typed object, loaded by gpuattest.settings.load_settings."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gpuattest.settings import TableSettings
from server.store.engine import PoolOptions


class VerifierSettings(TableSettings):
    """Everything `gpuattest verifier` can be told."""

    model_config = SettingsConfigDict(env_prefix="GPUATTEST_VERIFIER_", extra="forbid")
    toml_table: ClassVar[str] = "verifier"

    listen: str = Field("127.0.0.1:50051", description="host:port to serve gRPC on")
    db_url: str = Field(
        "sqlite:///gpuattest-verifier.db",
        description="database URL: sqlite:///path or postgresql://user@host:port/db",
    )
    db_pool_size: int = Field(10, ge=1, description="database connections kept open")
    db_pool_max_overflow: int = Field(
        10, ge=0, description="extra database connections opened under load"
    )
    db_pool_timeout_s: float = Field(
        10.0, gt=0, description="wait for a free database connection before failing a call"
    )
    db_connect_timeout_s: int = Field(
        5, ge=2, description="PostgreSQL: give up connecting after this many seconds"
    )
    retention_days: int = Field(
        0, ge=0, description="drop stored GPU windows older than this many days; 0 keeps all"
    )
    tls_cert: Path | None = Field(None, description="server certificate (PEM)")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="CA that signs agent certificates; set to require mutual TLS"
    )
    insecure_plaintext: bool = Field(
        False, description="serve without TLS; refused unless listening on loopback"
    )
    max_future_skew_s: float = Field(30.0, gt=0, description="how far ahead a window may end")
    nonce_ttl_s: float = Field(60.0, gt=0, description="challenge nonce lifetime")
    enrol_token_ttl_s: float = Field(3600.0, gt=0, description="enrolment token lifetime")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 disables")
    ingest_max_pending_envelopes: int = Field(
        8192, ge=1, description="envelopes queued for appraisal; beyond it Submit is overloaded"
    )
    ingest_max_queue_delay_ms: int = Field(
        100, ge=1, description="refuse Submit as overloaded when the queue takes longer to drain"
    )
    ingest_max_group_envelopes: int = Field(
        64, ge=1, description="envelopes appraised and committed in one transaction at most"
    )

    def pool_options(self) -> PoolOptions:
        """The database pool these settings ask for, for :meth:`server.store.Store.open`."""
        return PoolOptions(
            size=self.db_pool_size,
            max_overflow=self.db_pool_max_overflow,
            timeout_s=self.db_pool_timeout_s,
            connect_timeout_s=self.db_connect_timeout_s,
        )
