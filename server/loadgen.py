"""Load generator: many enrolled agents sending real signed evidence to one or more verifiers.

Every simulated agent has its own Ed25519 key, enrols with a real one-time token over gRPC,
and sends envelopes built and signed by the agent's own code (``agent.evidence``) with a
real sequence and hash chain, one envelope per host window covering all its GPUs, with the
features a real 10 s window of synthetic training telemetry gives. Each agent behaves like
the agent daemon's sender: windows are sealed at a fixed rate, and whatever is sealed and
not yet acknowledged goes out in one Submit call (up to a batch limit), one call in flight.

Signing costs the client as much CPU as appraisal costs the verifier, and both share this
machine, so every envelope is signed before the timed run starts (in worker processes).
Window times lie in the past, laid end to end; appraisal accepts them since they do not
lie in the future.

Afterwards the report says how many envelopes were sent, acknowledged and rejected, the
acknowledged rate, Submit latency percentiles, and whether every acknowledged
(agent, sequence) is stored exactly once: read from the database when its URL is known
(every sequence up to the acknowledgement present, each with one row per GPU), otherwise
from the verifier's ListAgents (windows stored = GPUs x acknowledged sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import click
import grpc
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from agent.client import (
    TRANSIENT_CODES,
    TRANSIENT_REASONS,
    VerifierClient,
    rejection_from,
)
from agent.collectors.synthetic import generate_training_trace
from agent.evidence import GpuFeatures, WindowClaims, build_evidence, sign_evidence
from agent.features import window_features
from agent.samples import GpuDescription, HostDescription
from agent.windows import WindowAssembler
from proto import envelope as dsse
from proto import verifier_pb2 as pb
from proto import verifier_pb2_grpc as pb_grpc
from proto.errors import GpuattestError
from proto.limits import WireLimits
from proto.signing import Ed25519Signer
from server.store import Store

NS_PER_S = 1_000_000_000
WINDOW_S = 10.0  # length of each simulated window; windows lie end to end in the past
SUBMIT_TIMEOUT_S = 30.0
SPAWN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ENROL_CONCURRENCY = 64
TOKEN_TTL_NS = 3600 * NS_PER_S
SOURCE = "loadgen"
# Retry pauses when the verifier has no hint to give (unreachable, database down).
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
RESULTS_CHECK_ATTEMPTS = 3
_PORT_LINE = re.compile(r"verifier serving on port (\d+)")


class LoadgenError(GpuattestError):
    """The load generator could not set up or run its load."""


@dataclass(frozen=True)
class LoadConfig:
    """What load to generate, against which verifiers."""

    verifiers: tuple[str, ...] = ()  # host:port of running verifiers
    spawn: int = 0  # verifier processes to start on db_url (instead of ``verifiers``)
    db_url: str | None = None  # to create tokens and check storage; required to spawn
    agents: int = 100
    gpus_per_agent: int = 8
    duration_s: float = 10.0
    window_rate: float = 1.0  # windows sealed per second by each agent
    batch: int = 32  # most envelopes in one Submit call
    switch_every_s: float = 0.0  # move each agent to the next verifier this often; 0 never
    channels: int = 16  # connections to each verifier, shared by the agents
    tokens: tuple[str, ...] = ()  # one-time tokens, when there is no db_url
    verifier_cpus: frozenset[int] = frozenset()  # pin spawned verifiers to these CPUs
    client_cpus: frozenset[int] = frozenset()  # pin this process to these CPUs
    sign_processes: int = 0  # processes signing before the run; 0: all CPUs, 1: in-process
    drain_s: float = 30.0  # after the run, this long to deliver what was sealed

    def validate(self) -> None:
        """Raise LoadgenError for a configuration that cannot run."""
        if self.spawn and not self.db_url:
            raise LoadgenError("spawning a verifier needs --db")
        if not self.spawn and not self.verifiers:
            raise LoadgenError("give --verifier HOST:PORT or --spawn-verifier --db URL")
        if not self.db_url and len(self.tokens) < self.agents:
            raise LoadgenError(f"without --db, give one enrolment token per agent ({self.agents})")
        if self.agents < 1 or self.gpus_per_agent < 1 or self.batch < 1:
            raise LoadgenError("agents, GPUs per agent and batch must be at least 1")
        if self.duration_s <= 0 or self.window_rate <= 0:
            raise LoadgenError("duration and window rate must be positive")


@dataclass
class LoadReport:
    """What happened. The first eight fields are the JSON keys the issue names."""

    sent: int  # distinct envelopes sent at least once
    acked: int  # distinct envelopes acknowledged (stored, or found stored)
    rejected: int  # envelopes the verifier refused (appraisal said no)
    rate_per_s: float  # acknowledged envelopes (= host-windows) per second of run
    p50_ms: float  # Submit latency, calls that were answered with an acknowledgement
    p95_ms: float
    p99_ms: float
    stored_exactly_once: bool
    offered_per_s: float = 0.0  # agents x window rate
    elapsed_s: float = 0.0
    submit_calls: int = 0
    envelopes_per_call: float = 0.0
    window_p99_ms: float = 0.0  # window sealed -> acknowledged (includes waiting at the agent)
    resent: int = 0  # envelopes sent again after a failed call
    refusals: dict[str, int] = field(default_factory=dict)  # retried calls, by reason
    agents: int = 0
    gpus_per_agent: int = 0
    verifiers: int = 0
    storage_check: str = ""
    # CPU time per acknowledged envelope while the load ran (spawned verifiers only):
    # 1e6 / this is what one fully available core sustains.
    verifier_cpu_us_per_envelope: float = 0.0
    client_cpu_us_per_envelope: float = 0.0


ISSUE_KEYS = (
    "sent",
    "acked",
    "rejected",
    "rate_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "stored_exactly_once",
)


# ---- the evidence each agent sends ------------------------------------------------------


@dataclass(frozen=True)
class SimAgent:
    """One simulated, enrolled agent."""

    index: int
    agent_id: str
    seed: bytes  # its private key's seed, so worker processes can sign as it
    hostname: str


def new_seed() -> bytes:
    """A fresh random Ed25519 private key, as its 32-byte seed."""
    return secrets.token_bytes(32)


def gpu_windows(gpus: int, seed: int = 1) -> list[GpuFeatures]:
    """Per-GPU features of one real 10 s window of synthetic training telemetry."""
    recording = generate_training_trace(seed=seed, gpus=gpus, seconds=WINDOW_S * 2.5)
    assembler = WindowAssembler(WINDOW_S)
    window = next(w for tick in recording.ticks for w in assembler.add(tick))
    features = window_features(window, ())
    return [
        GpuFeatures(index, f"GPU-loadgen-{index:02d}", 100, values)
        for index, values in sorted(features.items())
    ]


def sign_chain(
    agent: SimAgent, count: int, gpus: Sequence[GpuFeatures], end_ns: int
) -> list[bytes]:
    """``count`` chained, signed envelopes of ``agent``, windows ending by ``end_ns``."""
    signer = Ed25519Signer.from_seed(agent.seed)
    host = HostDescription(
        agent.hostname, "loadgen", "loadgen", tuple(GpuDescription(g.gpu_index) for g in gpus)
    )
    window_ns = int(WINDOW_S * NS_PER_S)
    previous = dsse.GENESIS_HASH
    envelopes = []
    for sequence in range(1, count + 1):
        end = end_ns - (count - sequence) * window_ns
        claims = WindowClaims(
            start_unix_s=(end - window_ns) / NS_PER_S,
            end_unix_s=end / NS_PER_S,
            host=host,
            gpus=gpus,
            raw_samples=sequence.to_bytes(8, "big"),
            source=SOURCE,
        )
        evidence = build_evidence(
            claims,
            agent_id=agent.agent_id,
            key_id=signer.key_id,
            sequence=sequence,
            previous_sha256=previous,
            created_unix_ns=time.time_ns(),
        )
        envelope = sign_evidence(evidence, signer)
        envelopes.append(envelope)
        previous = dsse.envelope_sha256(envelope)
    return envelopes


def presign(agents: Sequence[SimAgent], count: int, gpus: int, processes: int) -> list[list[bytes]]:
    """Every agent's envelopes for the run, signed in ``processes`` worker processes."""
    features = gpu_windows(gpus)
    end_ns = time.time_ns()
    if processes == 1:
        return [sign_chain(agent, count, features, end_ns) for agent in agents]
    # "spawn": this process already runs gRPC, which does not survive a fork.
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(sign_chain, a, count, features, end_ns) for a in agents]
        return [future.result() for future in futures]


# ---- spawned verifiers ------------------------------------------------------------------


@dataclass
class SpawnedVerifier:
    """A verifier running as a separate process on a free loopback port."""

    process: subprocess.Popen[str]
    address: str
    log_path: Path

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_verifier(
    db_url: str, cpus: frozenset[int] = frozenset(), env: dict[str, str] | None = None
) -> SpawnedVerifier:
    """Start ``python -m gpuattest verifier serve`` on 127.0.0.1:0 and wait for its port."""
    log_path = Path(tempfile.mkstemp(prefix="gpuattest-verifier-", suffix=".log")[1])
    command = [
        sys.executable,
        "-m",
        "gpuattest",
        "verifier",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db_url,
        "--insecure-plaintext",
    ]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    port = _read_port(process, log_path)
    return SpawnedVerifier(process, f"127.0.0.1:{port}", log_path)


def _read_port(process: subprocess.Popen[str], log_path: Path) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        match = _PORT_LINE.search(line)
        if match:
            return int(match.group(1))
    process.kill()
    raise LoadgenError(f"the verifier did not start: {log_path.read_text()[-2000:]}")


@contextlib.contextmanager
def spawned_verifiers(
    count: int, db_url: str, cpus: frozenset[int] = frozenset()
) -> Iterator[list[SpawnedVerifier]]:
    """``count`` verifier processes on one database, stopped on exit."""
    started: list[SpawnedVerifier] = []
    try:
        for _ in range(count):
            started.append(spawn_verifier(db_url, cpus))
        yield started
    finally:
        for verifier in started:
            verifier.stop()
            verifier.log_path.unlink(missing_ok=True)


# ---- enrolment ----------------------------------------------------------------------------


def create_tokens(db_url: str, hostnames: Sequence[str]) -> list[str]:
    """One fresh one-time enrolment token per host name, stored (hashed) in the database."""
    tokens = [secrets.token_urlsafe(32) for _ in hostnames]
    now = time.time_ns()
    with Store.open(db_url) as store:
        for token, hostname in zip(tokens, hostnames, strict=True):
            digest = hashlib.sha256(token.encode()).digest()
            store.add_enrol_token(digest, hostname, now + TOKEN_TTL_NS, now)
    return tokens


async def enrol_agents(
    channel: grpc.aio.Channel, tokens: Sequence[str], hostnames: Sequence[str]
) -> list[SimAgent]:
    """Enrol one new key per host over gRPC, ``ENROL_CONCURRENCY`` at a time."""
    client = VerifierClient(channel)
    gate = asyncio.Semaphore(ENROL_CONCURRENCY)

    async def enrol(index: int, token: str, hostname: str) -> SimAgent:
        seed = new_seed()
        public_key = Ed25519Signer.from_seed(seed).public_key.raw
        async with gate:
            response = await client.enroll(token, public_key, hostname)
        return SimAgent(index, response.agent_id, seed, hostname)

    return list(
        await asyncio.gather(
            *(enrol(i, t, h) for i, (t, h) in enumerate(zip(tokens, hostnames, strict=True)))
        )
    )


# ---- the run ------------------------------------------------------------------------------


class IntakeStub(Protocol):
    """The one call an agent makes: the EvidenceIntake stub, or a stand-in in tests."""

    def Submit(  # noqa: N802 - the gRPC method's name
        self, request: pb.SubmitRequest, *, timeout: float | None = None
    ) -> Awaitable[pb.SubmitResponse]:
        """Send a batch; raises grpc.aio.AioRpcError when refused."""
        ...


class Router:
    """Which verifier (and connection) an agent talks to, moving on every ``switch_every_s``."""

    def __init__(self, stubs: Sequence[Sequence[IntakeStub]], switch_every_s: float) -> None:
        self._stubs = stubs
        self._switch_every_s = switch_every_s

    def stub(self, agent_index: int, elapsed_s: float) -> IntakeStub:
        """The stub for this agent now."""
        moves = 0
        if self._switch_every_s > 0 and len(self._stubs) > 1:
            # Staggered, so agents do not all move in the same instant.
            phase = (agent_index % 97) / 97 * self._switch_every_s
            moves = int((elapsed_s + phase) / self._switch_every_s)
        connections = self._stubs[(agent_index + moves) % len(self._stubs)]
        return connections[agent_index % len(connections)]


@dataclass
class AgentRun:
    """One agent's progress and what it measured."""

    agent: SimAgent
    envelopes: list[bytes]
    acked: int = 0
    sent: int = 0  # highest sequence sent at least once
    resent: int = 0
    rejected: int = 0
    calls: int = 0
    call_latencies_s: list[float] = field(default_factory=list)
    window_latencies_s: list[float] = field(default_factory=list)
    refusals: Tally[str] = field(default_factory=Tally)
    stopped: str = ""  # why the agent gave up early, if it did


class AgentDriver:
    """Seal windows at the agent's rate; send what is sealed and unacknowledged."""

    def __init__(
        self, run: AgentRun, config: LoadConfig, router: Router, start: float, offset_s: float
    ) -> None:
        self._run = run
        self._config = config
        self._router = router
        self._start = start + offset_s  # first window sealed here (loop time)
        self._stop_at = start + config.duration_s

    def _sealed(self, now: float) -> int:
        if now < self._start:
            return 0
        count = math.floor((now - self._start) * self._config.window_rate) + 1
        return min(count, len(self._run.envelopes))

    def _sealed_at(self, sequence: int) -> float:
        return self._start + (sequence - 1) / self._config.window_rate

    async def drive(self) -> None:
        """Seal windows for the run's duration, then deliver what was sealed (or give up)."""
        loop = asyncio.get_running_loop()
        retry_s = RETRY_FIRST_S
        while not self._run.stopped:
            now = loop.time()
            sealed = self._sealed(min(now, self._stop_at))
            if self._run.acked >= sealed:
                if now >= self._stop_at:
                    return  # everything sealed is acknowledged
                await asyncio.sleep(max(0.0, self._sealed_at(self._run.acked + 1) - now))
                continue
            last = min(sealed, self._run.acked + self._config.batch)
            refused = await self._send(self._run.acked + 1, last, now - self._start)
            if refused is None:
                retry_s = RETRY_FIRST_S
                continue
            # Back off exponentially like the agent daemon, with jitter so refused agents do
            # not return all at once, but never sooner than the verifier's hint.
            await asyncio.sleep(max(retry_s * random.uniform(0.5, 1.5), refused.hint_s))
            retry_s = min(2 * retry_s, RETRY_MAX_S)

    async def _send(self, first: int, last: int, elapsed_s: float) -> Refusal | None:
        """Send sequences first..last; a transient refusal to wait out, or None."""
        run = self._run
        run.resent += max(0, min(run.sent, last) - first + 1)
        run.sent = max(run.sent, last)
        request = pb.SubmitRequest(envelopes=run.envelopes[first - 1 : last])
        stub = self._router.stub(run.agent.index, elapsed_s)
        began = time.perf_counter()
        try:
            response = await stub.Submit(request, timeout=SUBMIT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return self._refused(error)
        run.calls += 1
        run.call_latencies_s.append(time.perf_counter() - began)
        self._acknowledge(response.acked_sequence)
        return None

    def _acknowledge(self, acked: int) -> None:
        run = self._run
        now = asyncio.get_running_loop().time()
        for sequence in range(run.acked + 1, acked + 1):
            run.window_latencies_s.append(now - self._sealed_at(sequence))
        run.acked = max(run.acked, acked)

    def _refused(self, error: grpc.aio.AioRpcError) -> Refusal | None:
        rejection = rejection_from(error)
        reason = rejection.reason or error.code().name.lower()
        self._run.refusals[reason] += 1
        transient = error.code() in TRANSIENT_CODES and not rejection.reason
        if reason in TRANSIENT_REASONS or transient:
            hint_ms = rejection.retry_after_ms
            return Refusal(hint_ms / 1000 if hint_ms is not None else 0.0)
        # Appraisal refused an envelope: count it; resume from the acknowledgement if it
        # moved (the verifier holds more than we knew), otherwise this agent is stuck.
        self._run.rejected += 1
        acked = rejection.acked_sequence
        if acked is not None and acked > self._run.acked:
            self._acknowledge(acked)
        else:
            self._run.stopped = reason
        return None


@dataclass(frozen=True)
class Refusal:
    """A transient refusal: try again, after ``hint_s`` when the verifier gave one."""

    hint_s: float


@dataclass(frozen=True)
class CpuSpent:
    """CPU seconds (user + system) spent by the verifiers and by this process."""

    verifier_s: float
    client_s: float


class CpuMeter:
    """Measures CPU time of the given verifier processes and of this one, from creation."""

    def __init__(self, verifier_pids: Sequence[int]) -> None:
        self._verifiers = [psutil.Process(pid) for pid in verifier_pids]
        self._client = psutil.Process()
        self._start = self._read()

    def _read(self) -> CpuSpent:
        def busy(process: psutil.Process) -> float:
            times = process.cpu_times()
            return float(times.user + times.system)

        return CpuSpent(sum(busy(v) for v in self._verifiers), busy(self._client))

    def spent(self) -> CpuSpent:
        """CPU time since the meter was made."""
        now = self._read()
        return CpuSpent(
            now.verifier_s - self._start.verifier_s, now.client_s - self._start.client_s
        )


def _percentile_ms(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    return round(float(np.percentile(np.asarray(values), q)) * 1000, 2)


def _open_channels(addresses: Sequence[str], per_verifier: int) -> list[list[grpc.aio.Channel]]:
    limits = WireLimits()
    options = [
        ("grpc.max_send_message_length", limits.max_request_bytes),
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        # Without it, channels with equal arguments share one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return [
        [grpc.aio.insecure_channel(address, options=options) for _ in range(per_verifier)]
        for address in addresses
    ]


async def drive_agents(
    runs: Sequence[AgentRun],
    config: LoadConfig,
    channels: Sequence[Sequence[grpc.aio.Channel]],
    disturb: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> float:
    """Drive every agent for the configured duration; return the seconds it took."""
    router = Router(
        [[pb_grpc.EvidenceIntakeStub(c) for c in per_verifier] for per_verifier in channels],
        config.switch_every_s,
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    spread_s = 1 / config.window_rate  # agents' windows are sealed out of phase
    drivers = [
        AgentDriver(run, config, router, start, spread_s * i / len(runs))
        for i, run in enumerate(runs)
    ]
    tasks = [asyncio.create_task(driver.drive()) for driver in drivers]
    disturber = asyncio.create_task(disturb()) if disturb else None
    _done, late = await asyncio.wait(tasks, timeout=config.duration_s + config.drain_s)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if disturber is not None:
        await disturber
    return loop.time() - start


# ---- checking what was stored -------------------------------------------------------------


def check_stored_in_db(db_url: str, runs: Sequence[AgentRun], gpus: int) -> tuple[bool, str]:
    """Every acknowledged (agent, sequence) stored once, with one window per GPU.

    Per agent, one query: what it stored must be sequences 1..n without a hole, n at least
    what the agent had acknowledged, each with exactly one row per GPU. (The verifier may
    still be committing calls the load generator gave up on; those only make n larger.)
    """
    problems: list[str] = []
    with Store.open(db_url) as store:
        for run in runs:
            agent_id = run.agent.agent_id
            rows = store.list_windows(agent_id, 0, gpus * (len(run.envelopes) + 1) + 1)
            per_sequence = Tally(row.sequence for row in rows)
            stored = max(per_sequence, default=0)
            if stored < run.acked:
                problems.append(f"{agent_id}: acknowledged {run.acked}, stored up to {stored}")
            if set(per_sequence) != set(range(1, stored + 1)):
                problems.append(f"{agent_id}: stored sequences are not exactly 1..{stored}")
            pairs = {(row.sequence, row.gpu_index) for row in rows}
            if any(n != gpus for n in per_sequence.values()) or len(pairs) != len(rows):
                problems.append(f"{agent_id}: a sequence lacks or repeats GPU windows")
    detail = "; ".join(problems[:5]) or f"database: {len(runs)} agents, sequences 1..n"
    return not problems, detail


async def check_stored_via_results(
    channel: grpc.aio.Channel, runs: Sequence[AgentRun], gpus: int
) -> tuple[bool, str]:
    """The weaker check without database access: windows stored = GPUs x chain head.

    Counts and chain heads are not read in one snapshot, so calls the verifier is still
    committing can make them disagree for a moment: the check is repeated a few times.
    """
    problems: list[str] = []
    for _ in range(RESULTS_CHECK_ATTEMPTS):
        response = await pb_grpc.ResultsStub(channel).ListAgents(pb.ListAgentsRequest())
        summaries = {agent.agent_id: agent for agent in response.agents}
        problems = []
        for run in runs:
            summary = summaries.get(run.agent.agent_id)
            if summary is None or summary.acked_sequence < run.acked:
                problems.append(f"{run.agent.agent_id}: acknowledged sequence not held")
            elif summary.windows_stored != gpus * summary.acked_sequence:
                problems.append(f"{run.agent.agent_id}: {summary.windows_stored} windows stored")
        if not problems:
            break
        await asyncio.sleep(1.0)
    detail = "; ".join(problems[:5]) or f"ListAgents: {len(runs)} agents"
    return not problems, detail


# ---- putting it together ------------------------------------------------------------------


def summarise(
    runs: Sequence[AgentRun], config: LoadConfig, elapsed_s: float, stored: tuple[bool, str]
) -> LoadReport:
    """The report of a finished run."""
    calls = [latency for run in runs for latency in run.call_latencies_s]
    windows = [latency for run in runs for latency in run.window_latencies_s]
    acked = sum(run.acked for run in runs)
    total_calls = sum(run.calls for run in runs)
    refusals: Tally[str] = Tally()
    for run in runs:
        refusals.update(run.refusals)
    return LoadReport(
        sent=sum(run.sent for run in runs),
        acked=acked,
        rejected=sum(run.rejected for run in runs),
        rate_per_s=round(acked / elapsed_s, 1),
        p50_ms=_percentile_ms(calls, 50),
        p95_ms=_percentile_ms(calls, 95),
        p99_ms=_percentile_ms(calls, 99),
        stored_exactly_once=stored[0],
        offered_per_s=round(config.agents * config.window_rate, 1),
        elapsed_s=round(elapsed_s, 2),
        submit_calls=total_calls,
        envelopes_per_call=round(acked / total_calls, 2) if total_calls else 0.0,
        window_p99_ms=_percentile_ms(windows, 99),
        resent=sum(run.resent for run in runs),
        refusals=dict(refusals),
        agents=config.agents,
        gpus_per_agent=config.gpus_per_agent,
        verifiers=max(config.spawn, len(config.verifiers)),
        storage_check=stored[1],
    )


async def run_against(
    config: LoadConfig,
    addresses: Sequence[str],
    disturb: Callable[[], Coroutine[Any, Any, None]] | None = None,
    verifier_pids: Sequence[int] = (),
) -> LoadReport:
    """Enrol, pre-sign, drive and check, against verifiers already listening.

    With ``verifier_pids`` (processes on this machine) the report also gives the CPU time
    they spent per acknowledged envelope: a figure other load on the machine hardly moves.
    """
    hostnames = [f"loadgen-{i:05d}-{secrets.token_hex(3)}" for i in range(config.agents)]
    tokens = (
        await asyncio.to_thread(create_tokens, config.db_url, hostnames)
        if config.db_url
        else list(config.tokens[: config.agents])
    )
    channels = _open_channels(addresses, config.channels)
    try:
        agents = await enrol_agents(channels[0][0], tokens, hostnames)
        count = math.ceil(config.duration_s * config.window_rate) + 1
        processes = config.sign_processes or os.cpu_count() or 1
        envelopes = await asyncio.to_thread(
            presign, agents, count, config.gpus_per_agent, processes
        )
        runs = [AgentRun(agent, chain) for agent, chain in zip(agents, envelopes, strict=True)]
        meter = CpuMeter(verifier_pids)
        elapsed = await drive_agents(runs, config, channels, disturb)
        cpu = meter.spent()
        if config.db_url:
            stored = await asyncio.to_thread(
                check_stored_in_db, config.db_url, runs, config.gpus_per_agent
            )
        else:
            stored = await check_stored_via_results(channels[0][0], runs, config.gpus_per_agent)
    finally:
        for per_verifier in channels:
            for channel in per_verifier:
                await channel.close()
    report = summarise(runs, config, elapsed, stored)
    if report.acked:
        report.verifier_cpu_us_per_envelope = round(cpu.verifier_s / report.acked * 1e6, 1)
        report.client_cpu_us_per_envelope = round(cpu.client_s / report.acked * 1e6, 1)
    return report


def run_load(
    config: LoadConfig, disturb: Callable[[], Coroutine[Any, Any, None]] | None = None
) -> LoadReport:
    """Run the configured load (spawning verifiers if asked) and report on it."""
    config.validate()
    if config.client_cpus:
        os.sched_setaffinity(0, config.client_cpus)
    if not config.spawn:
        return asyncio.run(run_against(config, config.verifiers, disturb))
    assert config.db_url is not None
    with spawned_verifiers(config.spawn, config.db_url, config.verifier_cpus) as verifiers:
        addresses = [verifier.address for verifier in verifiers]
        pids = [verifier.process.pid for verifier in verifiers]
        return asyncio.run(run_against(config, addresses, disturb, pids))


def report_dict(report: LoadReport) -> dict[str, object]:
    """The report as plain JSON-ready values, issue-named keys first."""
    return asdict(report)


# ---- the command ------------------------------------------------------------------------


def cpu_set(text: str | None) -> frozenset[int]:
    """ "0", "0,1" or "0-3" as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return frozenset(cpus)


@click.command("loadgen")
@click.option("--verifier", "verifiers", multiple=True, help="HOST:PORT of a running verifier")
@click.option("--spawn-verifier", is_flag=True, help="start the verifier(s) here, on --db")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True)
@click.option("--db", "db_url", help="database URL: creates tokens, checks what was stored")
@click.option("--agents", type=click.IntRange(1), default=100, show_default=True)
@click.option("--gpus-per-agent", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.1), default=10.0)
@click.option(
    "--window-rate",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="windows sealed per second by each agent",
)
@click.option(
    "--batch",
    type=click.IntRange(1),
    default=32,
    show_default=True,
    help="most envelopes per Submit call",
)
@click.option(
    "--switch-every",
    "switch_every_s",
    type=float,
    default=0.0,
    help="move each agent to the next verifier this often (seconds)",
)
@click.option(
    "--channels",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="connections to each verifier",
)
@click.option(
    "--tokens-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="one enrolment token per line (without --db)",
)
@click.option("--verifier-cpus", help="pin spawned verifiers to these CPUs, e.g. 0 or 0-1")
@click.option("--client-cpus", help="pin the load generator to these CPUs, e.g. 1")
@click.option(
    "--sign-processes",
    type=click.IntRange(0),
    default=0,
    help="processes signing before the run (0: one per CPU)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def loadgen(
    verifiers: tuple[str, ...],
    spawn_verifier: bool,
    replicas: int,
    tokens_file: Path | None,
    verifier_cpus: str | None,
    client_cpus: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Simulate enrolled agents sending signed evidence; report rate, latency, storage."""
    if spawn_verifier == bool(verifiers):
        raise click.UsageError("give either --verifier HOST:PORT or --spawn-verifier --db URL")
    # SIGTERM unwinds like Ctrl-C, so spawned verifiers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tokens = tuple(tokens_file.read_text().split()) if tokens_file else ()
    config = LoadConfig(
        verifiers=verifiers,
        spawn=replicas if spawn_verifier else 0,
        tokens=tokens,
        verifier_cpus=cpu_set(verifier_cpus),
        client_cpus=cpu_set(client_cpus),
        **options,
    )
    report = run_load(config)
    if as_json:
        click.echo(json.dumps(report_dict(report), indent=2))
        return
    table = Table(title="loadgen")
    table.add_column("measure")
    table.add_column("value")
    for name, value in report_dict(report).items():
        table.add_row(name, str(value))
    Console(width=200).print(table)
