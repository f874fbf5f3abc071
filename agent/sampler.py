"""The sampling daemon's process: ``python -m agent.sampler [--log-level L] CONFIG_JSON``.

`gpuattest agent run` validates the settings and then execs this module in its own place
(same PID, so a service manager sees one process). Everything imported from here on stays
resident for the daemon's lifetime, so this module and what it imports must not pull in the
settings library (pydantic) or the command-line parser (click); ``tests/agent/test_sampler.py``
checks that.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.attribution import attribute_processes
from agent.client import VerifierClient, open_channel
from agent.collectors import open_collector
from agent.config import AgentConfig
from agent.daemon import AgentDaemon, DaemonOptions
from agent.identity import load_identity
from agent.samples import GpuProcess
from agent.spool import Spool
from proto.errors import GpuattestError
from proto.evidence_pb2 import ProcessAttribution
from proto.limits import WireLimits

if TYPE_CHECKING:
    from agent.probes.scheduler import ProbeScheduler

SPOOL_FILE = "spool.sqlite"
MIB = 1024 * 1024
MAX_CLAIM_BYTES = WireLimits().max_string_bytes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fit(text: str) -> str:
    """Cut a claim to the wire limit on strings (a deep cgroup path can be longer)."""
    return text.encode()[:MAX_CLAIM_BYTES].decode(errors="ignore")


async def run_agent(config: AgentConfig) -> AgentDaemon:
    """Run the daemon with everything built from ``config``; returns it when it stops."""
    identity, signer = load_identity(config.state_dir)
    hostname = config.hostname or identity.hostname
    collector = open_collector(config, hostname=hostname, clock=time.time)
    spool = Spool(config.state_dir / SPOOL_FILE, max_bytes=int(config.spool_max_mb * MIB))
    proc_root = config.proc_root

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
        async with open_channel(config) as channel:
            daemon = AgentDaemon(
                identity=identity,
                signer=signer,
                collector=collector,
                prober=_prober(config, collector.source),
                spool=spool,
                client=VerifierClient(channel),
                attribute=attribute,
                options=DaemonOptions(
                    window_s=config.window_s,
                    sample_interval_s=1.0 / config.sample_hz,
                    replay_speed=None if collector.source == "nvml" else config.replay_speed,
                    process_interval_s=config.process_interval_s,
                    batch_size=config.batch_size,
                    challenge_interval_s=config.challenge_interval_s,
                    exit_when_drained=config.exit_when_drained,
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


def _prober(config: AgentConfig, collector_source: str) -> ProbeScheduler | None:
    if not config.probes_enabled(collector_source):
        return None
    # Only now: the scheduler validates the probe worker's reports with pydantic, which a
    # daemon that never probes need not carry.
    from agent.probes.scheduler import build_prober

    return build_prober(config, collector_source)


def exec_argv(config: AgentConfig, log_level: int) -> list[str]:
    """The command line that turns a process into the sampling daemon for ``config``."""
    return [
        sys.executable,
        "-m",
        "agent.sampler",
        "--log-level",
        logging.getLevelName(log_level),
        config.to_json(),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon; our own errors become one line on stderr and status 1."""
    parser = argparse.ArgumentParser(prog="agent.sampler", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("config_json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        stats = asyncio.run(run_agent(AgentConfig.from_json(args.config_json))).stats
    except GpuattestError as exc:
        print(f"gpuattest: {exc}", file=sys.stderr)
        return 1
    print(f"windows sealed: {stats.windows_sealed}, envelopes delivered: {stats.envelopes_sent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
