"""The verifier's settings: one typed object, loaded by gpuattest.settings.load_settings."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gpuattest.settings import TableSettings


class VerifierSettings(TableSettings):
    """Everything `gpuattest verifier` can be told."""

    model_config = SettingsConfigDict(env_prefix="GPUATTEST_VERIFIER_", extra="forbid")
    toml_table: ClassVar[str] = "verifier"

    listen: str = Field("127.0.0.1:50051", description="host:port to serve gRPC on")
    db_url: str = Field("sqlite:///gpuattest-verifier.db", description="SQLAlchemy URL")
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
