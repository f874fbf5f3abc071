"""The agent's settings: one typed object, loaded by gpuattest.settings.load_settings."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent.config import AgentConfig
from gpuattest.settings import TableSettings


class AgentSettings(TableSettings):
    """Everything `gpuattest agent` can be told."""

    model_config = SettingsConfigDict(env_prefix="GPUATTEST_AGENT_", extra="forbid")
    toml_table: ClassVar[str] = "agent"

    verifier: str = Field("127.0.0.1:50051", description="verifier host:port")
    state_dir: Path = Field(Path("gpuattest-agent"), description="key, identity and spool")
    tls_ca: Path | None = Field(None, description="CA that signed the verifier's certificate")
    tls_cert: Path | None = Field(None, description="client certificate for mutual TLS")
    tls_key: Path | None = Field(None, description="client key for mutual TLS")
    insecure_plaintext: bool = Field(
        False, description="talk to the verifier without TLS; refused unless it is on loopback"
    )
    collector: Literal["auto", "nvml", "replay"] = Field(
        "auto", description="auto: NVML when a GPU is present, else replay"
    )
    replay_file: Path | None = Field(None, description="recording to replay")
    replay_speed: float = Field(
        1.0, ge=0, description="replay rate relative to real time; 0 = as fast as possible"
    )
    hostname: str | None = Field(None, description="host name to report; default: the OS's")
    window_s: float = Field(10.0, gt=0, le=10.0, description="window length per GPU")
    sample_hz: float = Field(10.0, gt=0, le=10.0, description="NVML sampling rate")
    nvml_timeout_s: float = Field(2.0, gt=0, description="timeout of each NVML call")
    process_interval_s: float = Field(5.0, gt=0, description="how often to list GPU processes")
    proc_root: Path = Field(Path("/proc"), description="where to read /proc/<pid>/cgroup")
    spool_max_mb: float = Field(256.0, gt=0, description="cap on the spool file's contents")
    batch_size: int = Field(32, ge=1, le=64, description="envelopes per Submit call")
    challenge_interval_s: float = Field(
        60.0, ge=0, description="how often to fetch a fresh nonce; 0 disables challenges"
    )
    exit_when_drained: bool = Field(
        False, description="exit once a replay is over and all evidence is acknowledged"
    )
    probes: Literal["auto", "on", "off"] = Field(
        "auto",
        description="probe kernels: auto = on live GPUs only; on = also on the CPU while "
        "replaying (tests, benchmarks); off = never",
    )
    # Each round is a fresh worker process that imports torch (~1.7 CPU s here): every
    # 5 minutes that is ~0.6 % of one core per host, far below the GPUs' 1 % duty budget.
    probe_interval_s: float = Field(
        300.0, ge=1.0, description="least time between probe rounds on one GPU"
    )
    probe_budget_frac: float = Field(
        0.01, gt=0, le=0.01, description="largest share of each GPU's time probes may use"
    )
    probe_timeout_s: float = Field(120.0, gt=0, description="kill a probe worker after this")
    probe_threads: int = Field(1, ge=1, description="torch threads in the probe worker")

    def config(self) -> AgentConfig:
        """These settings as the plain configuration the sampling daemon runs with."""
        return AgentConfig(**self.model_dump())
