"""The `gpuattest` command: one entry point, a subcommand group per part of the system.

Subcommands are imported only when invoked: the agent daemon must not carry the
verifier's, classifier's or benchmark code in its memory (DESIGN.md: <= 80 MB RSS).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from proto.errors import GpuattestError

# name -> "module:attribute" of the click command implementing it.
SUBCOMMANDS: dict[str, str] = {
    "agent": "agent.cli:agent",
    "verifier": "server.cli:verifier",
    "demo": "gpuattest.demo:demo",
    "bench": "gpuattest.bench:bench",
    "classify": "server.classifier.cli:classify",
    "classifier": "server.classifier.cli:classifier",
    "loadgen": "server.loadgen:loadgen",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """All subcommand names, without importing them."""
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return one subcommand."""
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="log at INFO level")
def cli(verbose: bool) -> None:
    """gpuattest: signed attestation of what runs on rented GPUs."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
