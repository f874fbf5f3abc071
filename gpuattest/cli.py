"""The `gpuattest` command: one entry point, a subcommand group per part of the system."""

from __future__ import annotations

import logging
import sys

import click

from agent.cli import agent
from gpuattest.demo import demo
from proto.errors import GpuattestError
from server.cli import verifier


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log at INFO level")
def cli(verbose: bool) -> None:
    """gpuattest: signed attestation of what runs on rented GPUs."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


cli.add_command(agent)
cli.add_command(verifier)
cli.add_command(demo)


def main() -> None:
    """Console-script entry: our own errors become one clear line and exit status 1."""
    try:
        status = cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GpuattestError as exc:
        click.echo(f"gpuattest: {exc}", err=True)
        sys.exit(1)
    # Without standalone mode click returns ctx.exit()'s code instead of exiting.
    if isinstance(status, int) and status:
        sys.exit(status)
