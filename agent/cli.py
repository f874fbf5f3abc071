"""`gpuattest agent ...`: enrol this host, then run the attestation daemon."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import click
import grpc

from agent.attribution import attribute_processes
from agent.client import VerifierClient, open_channel
from agent.collectors import open_collector
from agent.daemon import AgentDaemon, DaemonOptions
from agent.identity import default_hostname, enroll, load_identity
from agent.probes.scheduler import build_prober
from agent.samples import GpuProcess
from agent.settings import AgentSettings
from agent.spool import Spool
from gpuattest.settings import load_settings
from proto.errors import GpuattestError
from proto.evidence_pb2 import ProcessAttribution
from proto.limits import WireLimits

log = logging.getLogger(__name__)
SPOOL_FILE = "spool.sqlite"
MIB = 1024 * 1024
MAX_CLAIM_BYTES = WireLimits().max_string_bytes


class EnrolmentError(GpuattestError):
    """The verifier refused the enrolment, or could not be reached to ask."""


config_option = click.option(
    "--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML settings file"
)


def _connection_options(func: click.decorators.FC) -> click.decorators.FC:
    options = (
        click.option("--verifier", help="verifier host:port"),
        click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False)),
        click.option("--tls-ca", type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False)),
        click.option(
            "--insecure-plaintext", is_flag=True, default=None, help="no TLS; loopback only"
        ),
        click.option("--hostname", help="host name to report (default: the OS's)"),
    )
    for option in reversed(options):
        func = option(func)
    return func


@click.group("agent")
def agent() -> None:
    """The attestation agent that runs on each GPU host."""


@agent.command("enroll")
@config_option
@_connection_options
@click.option("--token", required=True, help="one-time token from `verifier enroll-token`")
def enroll_command(config: Path | None, token: str, **flags: object) -> None:
    """Create this agent's key and enrol it with the verifier."""
    settings = load_settings(AgentSettings, config, flags)
    hostname = settings.hostname or default_hostname()

    async def _enroll() -> str:
        async with open_channel(settings) as channel:
            try:
                identity = await enroll(
                    VerifierClient(channel), settings.state_dir, token, hostname, settings.verifier
                )
            except grpc.aio.AioRpcError as error:
                # The status and the verifier's reason (e.g. enrol_token_used) are what the
                # operator needs; a gRPC traceback is not.
                raise EnrolmentError(
                    f"enrolment with {settings.verifier} failed: "
                    f"{error.code().name}: {error.details()}"
                ) from error
        return identity.agent_id

    agent_id = asyncio.run(_enroll())
    click.echo(f"enrolled as {agent_id}; key and identity in {settings.state_dir}")


@agent.command("run")
@config_option
@_connection_options
@click.option("--collector", type=click.Choice(["auto", "nvml", "replay"]))
@click.option("--replay", "replay_file", type=click.Path(path_type=Path, exists=True))
@click.option("--speed", "replay_speed", type=float, help="replay speed; 0 = as fast as possible")
@click.option("--window", "window_s", type=float, help="window length in seconds (<= 10)")
@click.option("--exit-when-drained", is_flag=True, default=None)
def run_command(config: Path | None, **flags: object) -> None:
    """Sample, sign and send evidence until SIGINT/SIGTERM (or a replay is delivered)."""
    settings = load_settings(AgentSettings, config, flags)
    stats = asyncio.run(run_agent(settings)).stats
    click.echo(
        f"windows sealed: {stats.windows_sealed}, envelopes delivered: {stats.envelopes_sent}"
    )


def _fit(text: str) -> str:
    """Cut a claim to the wire limit on strings (a deep cgroup path can be longer)."""
    return text.encode()[:MAX_CLAIM_BYTES].decode(errors="ignore")


async def run_agent(settings: AgentSettings) -> AgentDaemon:
    """Run the daemon with everything built from ``settings``; returns it when it stops."""
    identity, signer = load_identity(settings.state_dir)
    hostname = settings.hostname or identity.hostname
    collector = open_collector(settings, hostname=hostname, clock=time.time)
    spool = Spool(settings.state_dir / SPOOL_FILE, max_bytes=int(settings.spool_max_mb * MIB))
    proc_root = settings.proc_root

    def attribute(processes: Sequence[GpuProcess]) -> list[ProcessAttribution]:
        return [
            ProcessAttribution(
                gpu_index=item.process.gpu_index,
                pid=item.process.pid,
                used_memory_mib=item.process.used_memory_mib,
                job_kind=str(item.attribution.job_kind),
                job_id=_fit(item.attribution.job_id),
                cgroup_path=_fit(item.attribution.cgroup_path),
                trusted=item.attribution.trusted,
            )
            for item in attribute_processes(processes, proc_root)
        ]

    try:
        async with open_channel(settings) as channel:
            daemon = AgentDaemon(
                identity=identity,
                signer=signer,
                collector=collector,
                prober=build_prober(settings, collector.source),
                spool=spool,
                client=VerifierClient(channel),
                attribute=attribute,
                options=DaemonOptions(
                    window_s=settings.window_s,
                    sample_interval_s=1.0 / settings.sample_hz,
                    replay_speed=None if collector.source == "nvml" else settings.replay_speed,
                    process_interval_s=settings.process_interval_s,
                    batch_size=settings.batch_size,
                    challenge_interval_s=settings.challenge_interval_s,
                    exit_when_drained=settings.exit_when_drained,
                ),
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, daemon.stop)
            await daemon.run()
            return daemon
    finally:
        spool.close()
        collector.close()
