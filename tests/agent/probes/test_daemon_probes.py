"""Probe results travel from the scheduler into signed evidence, and the daemon stays
torch-free: the real worker is a child process that is gone when the round is over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import VerifierClient
from agent.daemon import AgentDaemon, DaemonOptions
from agent.identity import Identity
from agent.probes.governor import GovernorPolicy
from agent.probes.scheduler import ProbePlan, ProbeScheduler
from agent.samples import GpuDescription, GpuProcess, GpuSample, HostDescription, Tick
from agent.spool import Spool
from proto.envelope import parse_envelope
from proto.evidence_pb2 import Evidence, ProcessAttribution
from proto.signing import Ed25519Signer
from proto.verifier_pb2 import ChallengeResponse, SubmitResponse
from tests.agent.probes.test_scheduler import FakeClock, ScriptedWorker

REPO_ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000.0
HOST = HostDescription(
    "host-probe",
    gpus=(GpuDescription(0, "GPU-synthetic-0", "NVIDIA H100 80GB HBM3", 81559, 700.0),),
)
OPTIONS = DaemonOptions(
    window_s=1.0, replay_speed=0, challenge_interval_s=0, exit_when_drained=True
)
RUN_TIMEOUT_S = 60.0  # a hang guard, not a timing assertion


@dataclass
class ListCollector:
    """Four synthetic ticks per second of one idle GPU, then the end of the replay."""

    seconds: int
    source: str = "synthetic-replay"
    _ticks: list[Tick] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ticks = [
            Tick(T0 + k * 0.25, (GpuSample(0, {"power_w": 70.0, "util_gpu_pct": 0.0}),))
            for k in range(self.seconds * 4)
        ]

    def describe_host(self) -> HostDescription:
        return HOST

    def read_tick(self) -> Tick | None:
        return self._ticks.pop(0) if self._ticks else None

    def processes(self) -> list[GpuProcess]:
        return []

    def close(self) -> None:
        pass


class AcceptingVerifier(VerifierClient):
    """Acknowledges everything it is sent, in order."""

    def __init__(self) -> None:  # no channel: nothing of the base is used
        self.acked = 0

    async def submit(self, envelopes: list[bytes]) -> SubmitResponse:
        self.acked += len(envelopes)
        return SubmitResponse(
            agent_id="agent-probe", acked_sequence=self.acked, accepted=len(envelopes)
        )

    async def challenge(self, agent_id: str) -> ChallengeResponse:
        raise AssertionError("challenges are off")


def no_attribution(processes: object) -> list[ProcessAttribution]:
    return []


async def run_daemon(prober: ProbeScheduler, spool_path: Path, seconds: int = 3) -> list[Evidence]:
    """Replay ``seconds`` of ticks through a daemon with ``prober``; the sealed evidence."""
    signer = Ed25519Signer.from_seed(bytes(32))
    with Spool(spool_path, 1 << 24) as spool:
        daemon = AgentDaemon(
            identity=Identity("agent-probe", signer.key_id, HOST.hostname, "verifier.test:1"),
            signer=signer,
            collector=ListCollector(seconds),
            spool=spool,
            client=AcceptingVerifier(),
            attribute=no_attribution,
            options=OPTIONS,
            prober=prober,
        )
        await asyncio.wait_for(daemon.run(), RUN_TIMEOUT_S)
        items = spool.pending(0, 100)
    return [Evidence.FromString(parse_envelope(item.envelope_bytes).payload) for item in items]


async def test_probe_results_ride_in_the_next_window(tmp_path: Path) -> None:
    prober = ProbeScheduler(
        ProbePlan(device="cuda"), GovernorPolicy(), clock=FakeClock(), runner=ScriptedWorker()
    )
    await prober.probe_once(HOST)  # finished before the first window is sealed
    first, *rest = await run_daemon(prober, tmp_path / "spool.sqlite")
    assert sorted(p.kind for p in first.probes) == ["bandwidth", "gemm", "launch_latency"]
    features = {f.name: f.value for f in first.gpus[0].features}
    assert features["probe_gemm_frac_of_limit"] > 0
    assert "probe_launch_latency_s" in features
    assert rest  # later windows: the governor kept the next round back
    assert all(not e.probes for e in rest)
    assert all(not f.name.startswith("probe_") for e in rest for f in e.gpus[0].features)


# Runs in a fresh interpreter: the daemon code path with a real worker round on the CPU.
CHILD = """
import asyncio, json, sys, psutil
from pathlib import Path
from agent.probes.scheduler import build_prober
from agent.settings import AgentSettings
from tests.agent.probes.test_daemon_probes import HOST, run_daemon

async def main():
    prober = build_prober(AgentSettings(probes="on").config(), "synthetic-replay")
    await prober.probe_once(HOST)
    evidence = await run_daemon(prober, Path(sys.argv[1]))
    print(json.dumps({
        "torch_imported": "torch" in sys.modules,
        "children": len(psutil.Process().children(recursive=True)),
        "probes": [
            [p.kind, p.device, p.identity, p.achieved_rate] for e in evidence for p in e.probes
        ],
        "failures": prober.stats.failures,
    }))

asyncio.run(main())
"""


def test_the_daemon_never_imports_torch_and_the_worker_exits(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "spool.sqlite")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )
    outcome = json.loads(completed.stdout)
    assert outcome["failures"] == 0
    assert outcome["torch_imported"] is False
    assert outcome["children"] == 0
    kinds = sorted(kind for kind, *_ in outcome["probes"])
    assert kinds == ["bandwidth", "gemm", "launch_latency"]
    for _, device, identity, rate in outcome["probes"]:
        assert device == "cpu"
        assert identity == "unknown-sku"
        assert rate > 0
