"""`gpuattest agent ...`: enrol this host, then run the attestation daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import click
import grpc

from agent.client import VerifierClient, open_channel
from agent.identity import default_hostname, enroll, load_identity
from agent.sampler import exec_argv
from agent.settings import AgentSettings
from gpuattest.settings import load_settings
from proto.errors import GpuattestError


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
        async with open_channel(settings.config()) as channel:
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
    """Sample, sign and send evidence until SIGINT/SIGTERM (or a replay is delivered).

    Settings are validated here; then this process becomes the sampling daemon
    (:mod:`agent.sampler`, same PID) so that what stays resident for months is only what
    sampling needs.
    """
    settings = load_settings(AgentSettings, config, flags)
    load_identity(settings.state_dir)  # a missing enrolment is reported before the exec
    argv = exec_argv(settings.config(), logging.getLogger().getEffectiveLevel())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # noqa: S606 - our own interpreter and module, no shell
