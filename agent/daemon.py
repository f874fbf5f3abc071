"""The agent daemon: sample -> windows -> features -> signed evidence -> spool -> verifier.

Cooperating tasks on one event loop:

* the sampler reads ticks from the collector (NVML on a worker thread, or a replay),
  cuts windows, signs one envelope per window and appends it to the durable spool;
* the sender ships spooled envelopes in order, resuming from the verifier's
  acknowledgement, and backs off while the verifier is unreachable;
* the challenger fetches a fresh nonce now and then, bound into the next evidence;
* the prober (when probes are on) runs probe rounds in a short-lived worker process under
  a duty-cycle budget; its results ride in the next window's evidence and features.

Nothing is acknowledged to anyone by the agent: evidence is safe once it is in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter
from tenacity.wait import wait_base

from agent.client import TRANSIENT_CODES, SubmitRejected, VerifierClient, rejection_from
from agent.evidence import GpuFeatures, WindowClaims, build_evidence, sign_evidence, sign_gap_notice
from agent.features import window_features
from agent.identity import Identity
from agent.probes.batch import ProbeBatch
from agent.samples import Collector, GpuDescription, GpuProcess, HostDescription, Tick
from agent.spool import Spool
from agent.windows import Window, WindowAssembler, raw_samples_bytes
from proto.evidence_pb2 import ProcessAttribution
from proto.limits import WireLimits
from proto.signing import Signer

if TYPE_CHECKING:  # the scheduler (and pydantic) load only when probes are on
    from agent.probes.scheduler import ProbeScheduler

log = logging.getLogger(__name__)

WallClock = Callable[[], float]  # seconds since the Unix epoch
Attributor = Callable[[Sequence[GpuProcess]], list[ProcessAttribution]]
# Pause after a rejection the agent cannot fix by itself (revoked key, a bug): the
# operator must act, and hammering the verifier would not help.
PERMANENT_REJECTION_PAUSE_S = 30.0
# Back-off between resends of a transiently refused batch: 0.2 s doubling, plus up to 1 s of
# jitter (tenacity's default) so agents refused together do not return together, up to 30 s.
RETRY_BACKOFF_FIRST_S = 0.2
RETRY_BACKOFF_MAX_S = 30.0
# The verifier's retry-after hint is obeyed up to this much. Its documented hints are 50 ms
# to 5 s (overloaded) and 1 s (store unavailable), so the cap leaves a busier verifier six
# times that, yet a buggy or hostile hint (hours, or 2**63 ms) cannot park the sender for
# longer than the longest back-off it would use anyway in an outage.
RETRY_AFTER_HINT_MAX_S = RETRY_BACKOFF_MAX_S


@dataclass(frozen=True)
class DaemonOptions:
    """The daemon's knobs, taken from AgentSettings by the CLI."""

    window_s: float = 10.0
    sample_interval_s: float = 0.1
    replay_speed: float | None = None  # None: live sampling; 0: as fast as possible
    process_interval_s: float = 5.0
    batch_size: int = 32
    challenge_interval_s: float = 60.0
    exit_when_drained: bool = False
    limits: WireLimits = field(default_factory=WireLimits)


@dataclass
class DaemonStats:
    """What the daemon did, for logs, metrics and tests."""

    windows_sealed: int = 0
    envelopes_sent: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    transient_errors: int = 0


class AgentDaemon:
    """Runs the sampler, sender and challenger until stopped or drained."""

    def __init__(
        self,
        *,
        identity: Identity,
        signer: Signer,
        collector: Collector,
        spool: Spool,
        client: VerifierClient,
        attribute: Attributor,
        options: DaemonOptions,
        clock: WallClock = time.time,
        prober: ProbeScheduler | None = None,
    ) -> None:
        self._identity = identity
        self._signer = signer
        self._collector = collector
        self._spool = spool
        self._client = client
        self._attribute = attribute
        self._options = options
        self._clock = clock
        self.stats = DaemonStats()
        self._wake_sender = asyncio.Event()
        self._sampling_done = asyncio.Event()
        self._stop = asyncio.Event()
        self._processes: list[ProcessAttribution] = []
        self._processes_read_at = -math.inf
        self._nonce: tuple[bytes, float] | None = None  # (nonce, expiry in wall seconds)
        self._remote_acked = spool.acked_sequence()
        self._prober = prober
        self._host: HostDescription | None = None
        self._host_known = asyncio.Event()

    def stop(self) -> None:
        """Ask the daemon to seal what it has, deliver what it can briefly, and return."""
        self._stop.set()

    async def run(self, shutdown_grace_s: float = 5.0) -> None:
        """Run until stopped, or (with exit_when_drained) until a replay is fully delivered.

        On stop the sampler seals its partial window and the sender gets
        ``shutdown_grace_s`` to deliver what is spooled; the rest waits in the spool.
        """
        sampler = asyncio.create_task(self._sample_loop(), name="sampler")
        sender = asyncio.create_task(self._send_loop(), name="sender")
        challenger = asyncio.create_task(self._challenge_loop(), name="challenger")
        stop_waiter = asyncio.create_task(self._stop.wait(), name="stop")
        prober = asyncio.create_task(self._probe_loop(), name="prober")
        # A dead sampler must not leave a daemon that looks alive but attests nothing.
        sampler.add_done_callback(self._stop_if_crashed)
        try:
            await asyncio.wait({sender, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                await asyncio.wait({sampler, sender}, timeout=shutdown_grace_s)
            for worker in (sampler, sender):
                if worker.done():
                    worker.result()  # surface a crash rather than exit quietly
        finally:
            for task in (sampler, challenger, prober, sender, stop_waiter):
                task.cancel()
            await asyncio.gather(
                sampler, challenger, prober, sender, stop_waiter, return_exceptions=True
            )

    def _stop_if_crashed(self, sampler: asyncio.Task[None]) -> None:
        if not sampler.cancelled() and sampler.exception() is not None:
            self._stop.set()

    # ---- sampling ----

    async def _sample_loop(self) -> None:
        host = await asyncio.to_thread(self._collector.describe_host)
        self._host = host
        self._host_known.set()
        gpus = {gpu.index: gpu for gpu in host.gpus}
        assembler = WindowAssembler(self._options.window_s)
        previous: Tick | None = None
        next_read = self._clock()
        try:
            while not self._stop.is_set():
                if self._options.replay_speed is None:  # live: hold the sampling rate
                    next_read += self._options.sample_interval_s
                    await asyncio.sleep(max(0.0, next_read - self._clock()))
                tick = await self._read_tick()
                if tick is None:
                    break
                await asyncio.sleep(self._replay_delay(previous, tick))
                await self._refresh_processes(tick.t_unix_s)
                if self._prober is not None:
                    self._prober.observe(tick)
                for window in assembler.add(tick):
                    self._seal(window, host, gpus)
                previous = tick
        finally:
            last = assembler.flush()
            if last is not None:
                self._seal(last, host, gpus)
            self._sampling_done.set()
            self._wake_sender.set()

    async def _read_tick(self) -> Tick | None:
        if self._options.replay_speed is None:
            return await asyncio.to_thread(self._collector.read_tick)
        return self._collector.read_tick()  # a replay only reads memory

    def _replay_delay(self, previous: Tick | None, tick: Tick) -> float:
        speed = self._options.replay_speed
        if previous is None or not speed:
            return 0.0
        return max(0.0, tick.t_unix_s - previous.t_unix_s) / speed

    async def _refresh_processes(self, now_s: float) -> None:
        # Listing processes costs milliseconds per GPU in NVML: only every few seconds.
        if now_s - self._processes_read_at < self._options.process_interval_s:
            return
        self._processes_read_at = now_s
        processes = await asyncio.to_thread(self._collector.processes)
        self._processes = self._attribute(processes)

    def _seal(self, window: Window, host: HostDescription, gpus: dict[int, GpuDescription]) -> None:
        probes = self._prober.take() if self._prober is not None else ProbeBatch()
        claims = WindowClaims(
            start_unix_s=window.start_unix_s,
            end_unix_s=window.end_unix_s,
            host=host,
            gpus=_gpu_features(window, host, gpus, probes),
            raw_samples=raw_samples_bytes(window),
            source=self._collector.source,
            processes=self._processes[: self._options.limits.max_processes],
            probes=probes.results[: self._options.limits.max_probes],
            nonce=self._take_nonce(),
        )
        sequence = self._spool.next_sequence()
        evidence = build_evidence(
            claims,
            agent_id=self._identity.agent_id,
            key_id=self._identity.key_id,
            sequence=sequence,
            previous_sha256=self._spool.chain_head(),
            created_unix_ns=round(self._clock() * 1e9),
        )
        self._spool.append(sequence, sign_evidence(evidence, self._signer), claims.raw_samples)
        self.stats.windows_sealed += 1
        self._wake_sender.set()

    def _take_nonce(self) -> bytes:
        # Bind a nonce only while caught up with the verifier, so the evidence carrying it
        # is delivered well before the nonce expires (a late answer is rejected, and the
        # envelope could then never be delivered).
        if self._nonce is None or self._spool.next_sequence() - 1 > self._remote_acked:
            return b""
        nonce, expires_s = self._nonce
        self._nonce = None
        return nonce if expires_s - self._clock() > self._options.window_s else b""

    # ---- probes ----

    async def _probe_loop(self) -> None:
        if self._prober is None:
            return
        await self._host_known.wait()
        assert self._host is not None
        await self._prober.run(self._host)

    # ---- challenges ----

    async def _challenge_loop(self) -> None:
        interval = self._options.challenge_interval_s
        if interval <= 0:
            return
        while True:
            try:
                response = await self._client.challenge(self._identity.agent_id)
                self._nonce = (response.nonce, response.expires_unix_ns / 1e9)
            except grpc.aio.AioRpcError as error:
                log.debug("no challenge this round: %s", error.code().name)
            await asyncio.sleep(interval)

    # ---- sending ----

    async def _send_loop(self) -> None:
        while True:
            envelopes = self._next_batch()
            if envelopes:
                await self._send(envelopes)
                continue
            finished = self._options.exit_when_drained or self._stop.is_set()
            if finished and self._sampling_done.is_set() and self._drained():
                return
            self._wake_sender.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_sender.wait(), timeout=1.0)

    def _drained(self) -> bool:
        return self._remote_acked >= self._spool.next_sequence() - 1

    def _next_batch(self) -> list[bytes]:
        self._attach_gap_notices()  # first: pending() stops before a gap without its notice
        items = self._spool.pending(self._remote_acked, self._options.batch_size)
        return [item.envelope_bytes for item in items]

    async def _send(self, envelopes: list[bytes]) -> None:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_transient),
                wait=HintedBackoff(
                    wait_exponential_jitter(
                        multiplier=RETRY_BACKOFF_FIRST_S, max=RETRY_BACKOFF_MAX_S
                    ),
                    hint_cap_s=RETRY_AFTER_HINT_MAX_S,
                ),
                before_sleep=self._count_transient,
            ):
                with attempt:
                    # Re-read before each retry: in a long outage the spool may have dropped
                    # this batch, and its gap notice must go instead. Delivering the dropped
                    # envelopes would leave that notice unacceptable to the verifier forever.
                    if attempt.retry_state.attempt_number > 1:
                        envelopes = self._next_batch()
                    response = await self._client.submit(envelopes)
        except SubmitRejected as rejection:
            await self._handle_rejection(rejection)
            return
        self._acknowledge(response.acked_sequence)
        self.stats.envelopes_sent += response.accepted

    def _count_transient(self, retry_state: RetryCallState) -> None:
        self.stats.transient_errors += 1
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        log.warning(
            "verifier unreachable or busy (%s); evidence stays spooled, resent in %.1f s",
            _refusal_summary(error),
            retry_state.upcoming_sleep,
        )

    def _acknowledge(self, acked: int) -> None:
        # The verifier's acknowledgement is the truth about where to resume, even if lower
        # than ours (a restored verifier): resending is safe, it is idempotent.
        self._remote_acked = acked
        self._spool.mark_acked(acked)

    async def _handle_rejection(self, rejection: SubmitRejected) -> None:
        key = f"{rejection.code.name}:{rejection.reason}"
        self.stats.rejections[key] = self.stats.rejections.get(key, 0) + 1
        # Resending at once helps only if the verifier moved our resume point; otherwise the
        # spool cannot supply what it wants, and resending would spin on identical RPCs.
        moved = rejection.acked_sequence not in (None, self._remote_acked)
        if rejection.acked_sequence is not None:
            self._acknowledge(rejection.acked_sequence)
        if rejection.reason in ("sequence_gap", "sequence_conflict") and moved:
            log.warning("verifier wants another sequence (%s); resuming from its ack", rejection)
            return
        log.error(
            "verifier REJECTED evidence after sequence %s: %s; it stays spooled, pausing %.0f s",
            self._remote_acked,
            rejection,
            PERMANENT_REJECTION_PAUSE_S,
        )
        await asyncio.sleep(PERMANENT_REJECTION_PAUSE_S)

    def _attach_gap_notices(self) -> None:
        for gap in self._spool.gaps_needing_notice():
            notice = sign_gap_notice(
                agent_id=self._identity.agent_id,
                signer=self._signer,
                first_missing=gap.first,
                last_missing=gap.last,
                previous_sha256=gap.previous_sha256,
                last_missing_sha256=gap.last_sha256,
                reason="spool cap reached: oldest undelivered evidence dropped",
                created_unix_ns=round(self._clock() * 1e9),
            )
            self._spool.attach_gap_notice(gap, notice)


def _gpu_features(
    window: Window, host: HostDescription, gpus: dict[int, GpuDescription], probes: ProbeBatch
) -> list[GpuFeatures]:
    """Features of every GPU sampled in the window (per-GPU, across the host's GPUs, and
    from probes that finished since the last window)."""
    features = window_features(window, host.gpus)
    for index, probe_features in probes.features.items():
        if index in features:
            features[index] = {**features[index], **probe_features}
    counts: dict[int, int] = {}
    for tick in window.ticks:
        for sample in tick.samples:
            counts[sample.gpu_index] = counts.get(sample.gpu_index, 0) + 1
    return [
        GpuFeatures(index, gpus[index].uuid if index in gpus else "", count, features[index])
        for index, count in sorted(counts.items())
    ]


class HintedBackoff(wait_base):
    """A tenacity wait: ``backoff``, or the verifier's retry-after hint when that is longer.

    The hint is the ``gpuattest-retry-after-ms`` trailer of the refusal that ended the
    attempt, capped at ``hint_cap_s``; a refusal without one waits ``backoff`` alone.
    """

    def __init__(self, backoff: Callable[[RetryCallState], float], hint_cap_s: float) -> None:
        self._backoff = backoff
        self._hint_cap_s = hint_cap_s

    def __call__(self, retry_state: RetryCallState) -> float:
        """Seconds to wait before the next attempt."""
        backoff_s = self._backoff(retry_state)
        outcome = retry_state.outcome
        hint_ms = retry_after_ms(outcome.exception()) if outcome is not None else None
        if hint_ms is None:
            return backoff_s
        return max(backoff_s, min(hint_ms / 1000, self._hint_cap_s))


def retry_after_ms(error: BaseException | None) -> int | None:
    """The verifier's retry-after hint carried by a failed Submit, if it sent one."""
    if isinstance(error, grpc.aio.AioRpcError):
        # A transient refusal reaches the sender as the raw gRPC error, trailers and all.
        return rejection_from(error).retry_after_ms
    if isinstance(error, SubmitRejected):
        return error.retry_after_ms
    return None


def _refusal_summary(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        rejection = rejection_from(error)
        return f"{rejection.code.name} {rejection.reason}".rstrip()
    return type(error).__name__


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in TRANSIENT_CODES
