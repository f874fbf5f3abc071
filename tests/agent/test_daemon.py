"""Behaviour of the agent daemon against a scripted in-memory verifier.

Everything here is real except the two ends: ticks come from an in-memory collector
(synthetic values, clearly not a recording) and envelopes go to :class:`FakeVerifier`, which
applies the real verifier's sequence rules (contiguous acknowledgement, idempotent resends,
sequence gaps and conflicts rejected with the acknowledgement in the rejection) and can be
told to fail, hang, forget or reject. The spool is a real SQLite file, signatures are real
Ed25519, and time is a fake clock. Retry back-off is patched to zero so tests stay fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity import AsyncRetrying, RetryCallState

from agent import daemon as daemon_module
from agent.client import SubmitRejected, VerifierClient
from agent.daemon import (
    RETRY_AFTER_HINT_MAX_S,
    AgentDaemon,
    DaemonOptions,
    HintedBackoff,
    retry_after_ms,
)
from agent.evidence import WindowClaims, build_evidence, sign_evidence
from agent.identity import Identity
from agent.samples import GpuDescription, GpuProcess, GpuSample, HostDescription, Tick
from agent.spool import DroppedRange, Spool
from proto.envelope import (
    EVIDENCE_PAYLOAD_TYPE,
    GAP_NOTICE_PAYLOAD_TYPE,
    GENESIS_HASH,
    envelope_sha256,
    parse_envelope,
    verify,
)
from proto.evidence_pb2 import Evidence, GapNotice, ProcessAttribution
from proto.signing import Ed25519Signer, PublicKey
from proto.transport import REASON_KEY, RETRY_AFTER_KEY
from proto.verifier_pb2 import ChallengeResponse, SubmitResponse

AGENT_ID = "agent-under-test"
T0 = 1_700_000_000.0  # first window start: whole seconds, so window bounds in ns are exact
WINDOW_S = 1.0
TICKS_PER_WINDOW = 4
NOW_S = T0 + 3600.0  # the fake wall clock; fixed unless a test advances it
NS_PER_S = 1_000_000_000
ROOMY_SPOOL_BYTES = 16 * 1024 * 1024
# A hang guard, not a timing assertion: a correct daemon returns in well under a second.
RUN_TIMEOUT_S = 10.0
PAYLOAD_TYPES = frozenset({EVIDENCE_PAYLOAD_TYPE, GAP_NOTICE_PAYLOAD_TYPE})

COLLECTOR_FAILURE = RuntimeError("synthetic collector failure")

HOST = HostDescription(
    hostname="host-a",
    driver_version="550.54.15",
    nvml_version="12.550.54.15",
    gpus=(
        GpuDescription(0, "GPU-synthetic-0000", "NVIDIA H100 80GB HBM3", 81559, 700.0, True),
        GpuDescription(1, "GPU-synthetic-0001", "NVIDIA H100 80GB HBM3", 81559, 700.0, True),
    ),
)
REPLAY = DaemonOptions(
    window_s=WINDOW_S,
    replay_speed=0,
    batch_size=3,
    challenge_interval_s=0,  # challenges only where a test asks for them
    exit_when_drained=True,
)


# ---- the fakes -------------------------------------------------------------------------


@dataclass
class FakeClock:
    """Wall-clock seconds that move only when told to."""

    now: float = NOW_S

    def __call__(self) -> float:
        return self.now


def synthetic_tick(t: float) -> Tick:
    """Two busy GPUs, listed out of index order on purpose."""
    return Tick(
        t,
        tuple(
            GpuSample(index, {"power_w": 600.0 + index, "util_gpu_pct": 97.0, "mem_used_mib": 4e4})
            for index in (1, 0)
        ),
    )


def replay_ticks(windows: int, first_window: int = 0) -> list[Tick]:
    """``TICKS_PER_WINDOW`` ticks in each of ``windows`` consecutive aligned windows."""
    step = WINDOW_S / TICKS_PER_WINDOW
    return [
        synthetic_tick(T0 + (first_window + w) * WINDOW_S + k * step)
        for w in range(windows)
        for k in range(TICKS_PER_WINDOW)
    ]


@dataclass
class ListCollector:
    """A replay from memory: the given ticks, then None (and ``on_exhausted`` once)."""

    ticks: list[Tick]
    on_exhausted: Callable[[], None] | None = None
    # When set, describe_host waits for it, so a test can order the start-up.
    host_gate: threading.Event | None = None
    crash: Exception | None = None  # raised instead of ending the replay
    source: str = "replay"
    _position: int = 0

    def describe_host(self) -> HostDescription:
        if self.host_gate is not None:
            self.host_gate.wait(timeout=RUN_TIMEOUT_S)
        return HOST

    def read_tick(self) -> Tick | None:
        if self._position < len(self.ticks):
            self._position += 1
            return self.ticks[self._position - 1]
        if self.crash is not None:
            raise self.crash
        if self.on_exhausted is not None:
            self.on_exhausted()
            self.on_exhausted = None
        return None

    def processes(self) -> list[GpuProcess]:
        return [GpuProcess(gpu_index=0, pid=4242, used_memory_mib=1024)]

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class LiveCollector:
    """Endless live ticks; each read moves the fake clock on by one sampling interval."""

    clock: FakeClock
    interval_s: float
    crash_after: int | None = None  # reads, then the collector fails for good
    reads: int = 0
    source: str = "nvml"

    def describe_host(self) -> HostDescription:
        return HOST

    def read_tick(self) -> Tick | None:
        if self.crash_after is not None and self.reads >= self.crash_after:
            raise COLLECTOR_FAILURE
        self.clock.now += self.interval_s
        self.reads += 1
        return synthetic_tick(self.clock.now)

    def processes(self) -> list[GpuProcess]:
        return []

    def close(self) -> None:
        """Nothing to release."""


def attribute(processes: Sequence[GpuProcess]) -> list[ProcessAttribution]:
    return [
        ProcessAttribution(
            gpu_index=p.gpu_index,
            pid=p.pid,
            used_memory_mib=p.used_memory_mib,
            job_kind="unattributed",
        )
        for p in processes
    ]


@dataclass(frozen=True)
class Opened:
    """A verified envelope: the sequences it covers and how it chains."""

    first: int
    last: int
    previous_sha256: bytes
    chain_head_after: bytes
    payload_type: str
    payload: bytes


def open_envelope(envelope_bytes: bytes, key: PublicKey) -> Opened:
    """Verify the signature with ``key`` (raises if it fails), then read the payload."""
    verified = verify(
        parse_envelope(envelope_bytes),
        lambda key_id: key if key_id == key.key_id else None,
        PAYLOAD_TYPES,
    )
    if verified.payload_type == EVIDENCE_PAYLOAD_TYPE:
        evidence = Evidence.FromString(verified.payload)
        return Opened(
            evidence.sequence,
            evidence.sequence,
            evidence.previous_envelope_sha256,
            envelope_sha256(envelope_bytes),
            verified.payload_type,
            verified.payload,
        )
    notice = GapNotice.FromString(verified.payload)
    return Opened(
        notice.first_missing,
        notice.last_missing,
        notice.previous_envelope_sha256,
        notice.last_missing_envelope_sha256,
        verified.payload_type,
        verified.payload,
    )


def unavailable(code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(),
        details="synthetic transport failure",
    )


def refused(code: grpc.StatusCode, reason: str, retry_after: str | None) -> grpc.aio.AioRpcError:
    """A "not now" refusal as the verifier sends it: reason and retry-after in the trailers."""
    trailers = grpc.aio.Metadata((REASON_KEY, reason))
    if retry_after is not None:
        trailers.add(RETRY_AFTER_KEY, retry_after)
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=trailers,
        details="synthetic refusal",
    )


def overloaded(retry_after: str | None) -> grpc.aio.AioRpcError:
    return refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", retry_after)


def rejected(reason: str, acked: int | None, code: grpc.StatusCode) -> SubmitRejected:
    return SubmitRejected(code=code, reason=reason, detail="synthetic", acked_sequence=acked)


class FakeVerifier(VerifierClient):
    """In-memory verifier with the real sequence rules, scriptable per call (1-based)."""

    def __init__(self, key: PublicKey) -> None:  # no channel: nothing of the base is used
        self._key = key
        self.stored: dict[int, bytes] = {}  # sequence -> envelope (a notice at its last)
        self._heads: dict[int, bytes] = {0: GENESIS_HASH}
        self.acked = 0
        self.duplicates = 0
        self.attempts: list[list[int]] = []  # last sequence of each item, per call
        self.accepted_batches: list[list[int]] = []  # the calls that succeeded
        self.down = False  # every call fails UNAVAILABLE while set
        self.gate: asyncio.Event | None = None  # calls wait for it before anything else
        self.fail_before: dict[int, BaseException] = {}  # raised before storing
        self.fail_after: dict[int, BaseException] = {}  # raised after storing: a lost answer
        self.forget_when_acked: tuple[int, int] | None = None  # (at, back_to): a restore, once
        self.on_call: Callable[[int], None] | None = None
        self.challenge_response: ChallengeResponse | BaseException | None = None
        self.challenged = threading.Event()

    async def submit(self, envelopes: list[bytes]) -> SubmitResponse:
        await asyncio.sleep(0)  # a real RPC always yields to the event loop
        if self.gate is not None:
            await self.gate.wait()
        sequences = [open_envelope(e, self._key).last for e in envelopes]
        self.attempts.append(sequences)
        call = len(self.attempts)
        if self.on_call is not None:
            self.on_call(call)
        if self.down:
            raise unavailable()
        if call in self.fail_before:
            raise self.fail_before[call]
        accepted = sum(self._ingest(envelope) for envelope in envelopes)
        self._maybe_forget()
        if call in self.fail_after:
            raise self.fail_after[call]
        self.accepted_batches.append(sequences)
        return SubmitResponse(agent_id=AGENT_ID, acked_sequence=self.acked, accepted=accepted)

    async def challenge(self, agent_id: str) -> ChallengeResponse:
        assert agent_id == AGENT_ID
        self.challenged.set()
        response = self.challenge_response
        if isinstance(response, BaseException):
            raise response
        assert response is not None, "this test did not expect a challenge"
        return response

    def restore_to(self, sequence: int) -> None:
        """Forget everything after ``sequence``, like a verifier restored from a backup."""
        self.stored = {s: e for s, e in self.stored.items() if s <= sequence}
        self._heads = {s: h for s, h in self._heads.items() if s <= sequence}
        self.acked = sequence

    def _ingest(self, envelope_bytes: bytes) -> bool:
        item = open_envelope(envelope_bytes, self._key)
        if item.last <= self.acked:
            if self.stored.get(item.last) == envelope_bytes:
                self.duplicates += 1
                return False
            raise rejected("sequence_conflict", self.acked, grpc.StatusCode.FAILED_PRECONDITION)
        if item.first != self.acked + 1:
            raise rejected("sequence_gap", self.acked, grpc.StatusCode.FAILED_PRECONDITION)
        # A broken chain is a daemon bug, not a verdict to script: fail the test loudly.
        assert item.previous_sha256 == self._heads[self.acked], f"chain broken at {item.first}"
        self.stored[item.last] = envelope_bytes
        self._heads[item.last] = item.chain_head_after
        self.acked = item.last
        return True

    def _maybe_forget(self) -> None:
        if self.forget_when_acked is not None and self.acked >= self.forget_when_acked[0]:
            self.restore_to(self.forget_when_acked[1])
            self.forget_when_acked = None


@dataclass
class RecordingWait:
    """Stands in for the exponential back-off: a fixed answer, and every retry is recorded."""

    seconds: float = 0.0
    attempts: list[int] = field(default_factory=list)

    def __call__(self, retry_state: RetryCallState) -> float:
        self.attempts.append(retry_state.attempt_number)
        return self.seconds


# ---- fixtures and helpers ------------------------------------------------------------


@pytest.fixture(autouse=True)
def backoff(monkeypatch: pytest.MonkeyPatch) -> RecordingWait:
    wait = RecordingWait()

    def no_wait(*args: object, **kwargs: object) -> RecordingWait:
        return wait

    monkeypatch.setattr(daemon_module, "wait_exponential_jitter", no_wait)
    return wait


@pytest.fixture
def chosen_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the daemon's sender chose before each retry, without sleeping them."""
    chosen: list[float] = []

    def recording(
        backoff: Callable[[RetryCallState], float], hint_cap_s: float
    ) -> Callable[[RetryCallState], float]:
        real = HintedBackoff(backoff, hint_cap_s)

        def wait(retry_state: RetryCallState) -> float:
            chosen.append(real(retry_state))
            return 0.0

        return wait

    monkeypatch.setattr(daemon_module, "HintedBackoff", recording)
    return chosen


@pytest.fixture
def short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "PERMANENT_REJECTION_PAUSE_S", 0.001)


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.from_seed(bytes(range(32)))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(tmp_path / "spool.sqlite", ROOMY_SPOOL_BYTES) as opened:
        yield opened


@pytest.fixture
def verifier(signer: Ed25519Signer) -> FakeVerifier:
    return FakeVerifier(signer.public_key)


def make_daemon(
    collector: ListCollector | LiveCollector,
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    options: DaemonOptions = REPLAY,
) -> AgentDaemon:
    return AgentDaemon(
        identity=Identity(AGENT_ID, signer.key_id, HOST.hostname, "verifier.test:8443"),
        signer=signer,
        collector=collector,
        spool=spool,
        client=verifier,
        attribute=attribute,
        options=options,
        clock=clock,
    )


async def run_to_end(daemon: AgentDaemon, shutdown_grace_s: float = 5.0) -> None:
    await asyncio.wait_for(daemon.run(shutdown_grace_s), RUN_TIMEOUT_S)


def assert_complete_chain(stored: dict[int, bytes], key: PublicKey, last: int) -> list[Opened]:
    """Every sequence 1..last is covered exactly once, each signed by ``key``, all chained."""
    opened = [open_envelope(stored[s], key) for s in sorted(stored)]
    expected_first, head = 1, GENESIS_HASH
    for item in opened:
        assert item.first == expected_first
        assert item.previous_sha256 == head
        expected_first, head = item.last + 1, item.chain_head_after
    assert expected_first == last + 1
    return opened


def is_daemon_error(record: logging.LogRecord) -> bool:
    return record.name == "agent.daemon" and record.levelno == logging.ERROR


def evidence_of(item: Opened) -> Evidence:
    assert item.payload_type == EVIDENCE_PAYLOAD_TYPE
    return Evidence.FromString(item.payload)


def open_when_exhausted(verifier: FakeVerifier) -> Callable[[], None]:
    """An on_exhausted hook ending the verifier's outage once every window is sealed."""

    def end_outage() -> None:
        verifier.down = False
        if verifier.gate is not None:
            verifier.gate.set()

    return end_outage


# ---- delivery --------------------------------------------------------------------------


async def test_replay_is_sealed_signed_chained_and_delivered_in_order(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    windows = 7
    daemon = make_daemon(ListCollector(replay_ticks(windows)), spool, verifier, signer, clock)

    await run_to_end(daemon)

    opened = assert_complete_chain(verifier.stored, signer.public_key, windows)
    delivered = [s for batch in verifier.accepted_batches for s in batch]
    assert delivered == list(range(1, windows + 1))
    assert all(1 <= len(batch) <= REPLAY.batch_size for batch in verifier.accepted_batches)
    assert spool.acked_sequence() == windows
    assert (daemon.stats.windows_sealed, daemon.stats.envelopes_sent) == (windows, windows)
    for sequence, item in enumerate(opened, start=1):
        evidence = evidence_of(item)
        assert (evidence.agent_id, evidence.key_id) == (AGENT_ID, signer.key_id)
        assert evidence.sequence == sequence
        start_ns = round(T0 + sequence - 1) * NS_PER_S
        assert evidence.window_start_unix_ns == start_ns
        assert evidence.window_end_unix_ns == start_ns + round(WINDOW_S * NS_PER_S)
        assert [(g.gpu_index, g.gpu_uuid, g.sample_count) for g in evidence.gpus] == [
            (0, "GPU-synthetic-0000", TICKS_PER_WINDOW),
            (1, "GPU-synthetic-0001", TICKS_PER_WINDOW),
        ]
        assert evidence.host.hostname == HOST.hostname
        raw = spool.raw_samples(sequence)
        assert raw is not None
        assert evidence.raw_samples_sha256 == hashlib.sha256(raw).digest()
        assert [(p.gpu_index, p.pid) for p in evidence.processes] == [(0, 4242)]
        assert (evidence.source, evidence.nonce) == ("replay", b"")
        assert evidence.created_unix_ns == round(NOW_S * NS_PER_S)


async def test_empty_replay_exits_without_sending(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    daemon = make_daemon(ListCollector([]), spool, verifier, signer, clock)

    await run_to_end(daemon)

    assert verifier.attempts == []
    assert daemon.stats.windows_sealed == 0


async def test_backlog_after_an_outage_goes_out_in_full_batches(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    verifier.down = True
    collector = ListCollector(replay_ticks(7), on_exhausted=open_when_exhausted(verifier))
    daemon = make_daemon(collector, spool, verifier, signer, clock)

    await run_to_end(daemon)

    assert verifier.accepted_batches == [[1, 2, 3], [4, 5, 6], [7]]
    assert daemon.stats.transient_errors >= 1
    assert_complete_chain(verifier.stored, signer.public_key, 7)


# ---- transient failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
    ids=["unavailable", "deadline-exceeded", "resource-exhausted"],
)
async def test_transient_errors_are_retried_without_loss_or_duplication(
    code: grpc.StatusCode,
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    backoff: RecordingWait,
) -> None:
    windows = 7
    verifier.fail_before = {1: unavailable(code), 2: unavailable(code)}
    verifier.fail_after = {3: unavailable(code)}  # stored, but the answer is lost
    daemon = make_daemon(ListCollector(replay_ticks(windows)), spool, verifier, signer, clock)

    await run_to_end(daemon)

    assert_complete_chain(verifier.stored, signer.public_key, windows)
    assert daemon.stats.transient_errors == 3
    assert backoff.attempts == [1, 2, 3]  # the back-off was asked before every retry
    # The resend after the lost answer is acknowledged as duplicates, not stored twice.
    assert verifier.duplicates == len(verifier.attempts[2])
    assert spool.acked_sequence() == windows


async def test_retry_waits_for_the_verifiers_hint_capped_and_backs_off_without_one(
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    backoff: RecordingWait,
    chosen_waits: list[float],
) -> None:
    backoff.seconds = 0.25
    verifier.fail_before = {
        1: overloaded("750"),  # longer than the back-off: the hint wins
        2: overloaded("100"),  # shorter: the back-off wins
        3: unavailable(),  # a transport failure carries no hint
        4: refused(grpc.StatusCode.UNAVAILABLE, "store_unavailable", "1000"),
        5: overloaded(str(24 * 3600 * 1000)),  # a day: capped
    }
    daemon = make_daemon(ListCollector(replay_ticks(3)), spool, verifier, signer, clock)

    await run_to_end(daemon)

    assert chosen_waits == [0.75, 0.25, 0.25, 1.0, RETRY_AFTER_HINT_MAX_S]
    assert backoff.attempts == [1, 2, 3, 4, 5]
    assert daemon.stats.transient_errors == 5
    assert_complete_chain(verifier.stored, signer.public_key, 3)


# ---- the hinted wait on its own ------------------------------------------------------

BACKOFF_S = 0.4  # what the stand-in back-off asks for in the cases below
HINT_CAP_S = 30.0


def failed_attempt(error: BaseException) -> RetryCallState:
    """Tenacity's state after an attempt that raised ``error``."""
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.set_exception((type(error), error, None))
    return state


def fixed_backoff(seconds: float) -> Callable[[RetryCallState], float]:
    return lambda retry_state: seconds


@dataclass(frozen=True)
class HintCase:
    error: BaseException
    wait_s: float


HINT_CASES = {
    "hint-longer-than-backoff": HintCase(overloaded("2000"), 2.0),
    "hint-shorter-than-backoff": HintCase(overloaded("50"), BACKOFF_S),
    "hint-equal-to-backoff": HintCase(overloaded("400"), BACKOFF_S),
    "zero-hint": HintCase(overloaded("0"), BACKOFF_S),
    "store-unavailable-hint": HintCase(
        refused(grpc.StatusCode.UNAVAILABLE, "store_unavailable", "1000"), 1.0
    ),
    "no-hint-trailer": HintCase(overloaded(None), BACKOFF_S),
    "transport-failure-without-trailers": HintCase(unavailable(), BACKOFF_S),
    "hint-just-under-cap": HintCase(overloaded("29999"), 29.999),
    "hour-long-hint-capped": HintCase(overloaded("3600000"), HINT_CAP_S),
    "int64-max-hint-capped": HintCase(overloaded(str(2**63 - 1)), HINT_CAP_S),
    "hint-wider-than-uint64-ignored": HintCase(overloaded("9" * 5000), BACKOFF_S),
    "negative-hint-ignored": HintCase(overloaded("-5000"), BACKOFF_S),
    "fractional-hint-ignored": HintCase(overloaded("1500.5"), BACKOFF_S),
    "non-ascii-digit-hint-ignored": HintCase(overloaded("\u00b2"), BACKOFF_S),
    "empty-hint-ignored": HintCase(overloaded(""), BACKOFF_S),
    "rejection-object-with-hint": HintCase(
        SubmitRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", "", None, 3000), 3.0
    ),
    "not-a-grpc-error": HintCase(RuntimeError("synthetic"), BACKOFF_S),
}


@pytest.mark.parametrize("case", HINT_CASES.values(), ids=HINT_CASES.keys())
def test_hinted_backoff_waits_the_longer_of_backoff_and_capped_hint(case: HintCase) -> None:
    wait = HintedBackoff(fixed_backoff(BACKOFF_S), hint_cap_s=HINT_CAP_S)

    assert wait(failed_attempt(case.error)) == pytest.approx(case.wait_s)


def test_hinted_backoff_is_the_backoff_when_no_attempt_has_failed() -> None:
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})

    assert HintedBackoff(fixed_backoff(BACKOFF_S), hint_cap_s=HINT_CAP_S)(state) == BACKOFF_S


@given(
    hint_ms=st.integers(min_value=0, max_value=10**20 - 1),
    backoff_s=st.floats(min_value=0.0, max_value=60.0),
)
def test_hinted_backoff_is_never_sooner_than_either_nor_longer_than_the_cap(
    hint_ms: int, backoff_s: float
) -> None:
    wait = HintedBackoff(fixed_backoff(backoff_s), hint_cap_s=HINT_CAP_S)

    waited = wait(failed_attempt(overloaded(str(hint_ms))))

    assert waited >= backoff_s
    assert waited >= min(hint_ms / 1000, HINT_CAP_S)
    assert waited <= max(backoff_s, HINT_CAP_S)


def test_retry_after_is_read_from_the_refusal_trailers() -> None:
    assert retry_after_ms(overloaded("1234")) == 1234
    assert retry_after_ms(unavailable()) is None
    assert retry_after_ms(None) is None


# ---- the verifier's acknowledgement is the truth ------------------------------------


async def test_sequence_gap_rejection_resumes_from_the_acknowledgement_in_it(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    first_run = make_daemon(ListCollector(replay_ticks(3)), spool, verifier, signer, clock)
    await run_to_end(first_run)
    assert spool.acked_sequence() == 3
    verifier.restore_to(1)  # the verifier lost 2..3; the agent still believes they are acked
    second_run = make_daemon(
        ListCollector(replay_ticks(3, first_window=3)), spool, verifier, signer, clock
    )

    await run_to_end(second_run)

    assert second_run.stats.rejections == {"FAILED_PRECONDITION:sequence_gap": 1}
    rejected_at = next(i for i, batch in enumerate(verifier.attempts) if batch[0] == 4)
    assert verifier.attempts[rejected_at + 1][0] == 2  # resent from the verifier's ack
    assert_complete_chain(verifier.stored, signer.public_key, 6)
    assert spool.acked_sequence() == 6


async def test_lower_acknowledgement_from_a_restored_verifier_makes_the_agent_resend(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    windows = 7
    verifier.forget_when_acked = (3, 1)  # right after storing 3 it is restored to 1
    daemon = make_daemon(ListCollector(replay_ticks(windows)), spool, verifier, signer, clock)

    await run_to_end(daemon)

    assert daemon.stats.rejections == {}
    restored_at = next(i for i, b in enumerate(verifier.attempts) if b[-1] >= 3)
    assert verifier.attempts[restored_at + 1][0] == 2
    assert_complete_chain(verifier.stored, signer.public_key, windows)
    assert spool.acked_sequence() == windows


# ---- rejections ------------------------------------------------------------------------


@pytest.mark.usefixtures("short_pause")
async def test_permanent_rejection_is_counted_logged_and_evidence_stays_spooled(
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    windows = 4
    revoked = rejected("key_revoked", 0, grpc.StatusCode.PERMISSION_DENIED)
    verifier.fail_before = {1: revoked, 2: revoked}  # then the operator fixes the key
    spool_at_rejection: list[tuple[int, int]] = []

    def look_at_spool(call: int) -> None:
        if call in verifier.fail_before:
            spool_at_rejection.append((spool.acked_sequence(), spool.pending(0, 100)[0].sequence))

    verifier.on_call = look_at_spool
    daemon = make_daemon(ListCollector(replay_ticks(windows)), spool, verifier, signer, clock)

    with caplog.at_level(logging.WARNING, logger="agent.daemon"):
        await run_to_end(daemon)

    assert daemon.stats.rejections == {"PERMISSION_DENIED:key_revoked": 2}
    errors = [r for r in caplog.records if is_daemon_error(r)]
    assert len(errors) == 2
    assert all("key_revoked" in r.getMessage() for r in errors)
    assert spool_at_rejection == [(0, 1), (0, 1)]  # nothing acked, nothing dropped
    assert_complete_chain(verifier.stored, signer.public_key, windows)


@pytest.mark.parametrize(
    "acked_in_rejection",
    [None, 0],
    ids=["no-ack-in-rejection", "ack-unchanged"],
)
async def test_sequence_rejection_without_progress_pauses_instead_of_spinning(
    acked_in_rejection: int | None,
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gap the agent cannot close by resending (its spool no longer holds what the
    verifier wants) must not turn into a tight loop of identical RPCs."""
    monkeypatch.setattr(daemon_module, "PERMANENT_REJECTION_PAUSE_S", RUN_TIMEOUT_S * 10)
    stuck = rejected("sequence_gap", acked_in_rejection, grpc.StatusCode.FAILED_PRECONDITION)
    verifier.fail_before = dict.fromkeys(range(1, 1000), stuck)
    daemon = make_daemon(ListCollector(replay_ticks(2)), spool, verifier, signer, clock)
    verifier.on_call = lambda call: daemon.stop()

    with caplog.at_level(logging.WARNING, logger="agent.daemon"):
        await run_to_end(daemon, shutdown_grace_s=0.2)

    assert len(verifier.attempts) == 1
    assert any(is_daemon_error(r) for r in caplog.records)
    assert spool.acked_sequence() == 0


# ---- the spool cap ---------------------------------------------------------------------


async def entry_size_of_one_window(tmp_path: Path, signer: Ed25519Signer) -> int:
    """Stored bytes of one spooled window, measured with the same daemon on a spare spool."""
    with Spool(tmp_path / "measure.sqlite", ROOMY_SPOOL_BYTES) as spare:
        probe = make_daemon(
            ListCollector(replay_ticks(2)),
            spare,
            FakeVerifier(signer.public_key),
            signer,
            FakeClock(),
        )
        await run_to_end(probe)
        stats = spare.stats()
        return stats.stored_bytes // stats.entries


async def test_spool_overflow_is_replaced_by_a_signed_gap_notice(
    tmp_path: Path,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    windows = 8
    entry_bytes = await entry_size_of_one_window(tmp_path, signer)
    with Spool(tmp_path / "small.sqlite", max_bytes=entry_bytes * 7 // 2) as small:
        noticed: dict[int, DroppedRange] = {}  # last sequence -> the range the spool reported
        attach = small.attach_gap_notice

        def record_gap(gap: DroppedRange, notice: bytes) -> None:
            noticed[gap.last] = gap
            attach(gap, notice)

        monkeypatch.setattr(small, "attach_gap_notice", record_gap)
        verifier.down = True  # an outage long enough to overflow the spool
        collector = ListCollector(replay_ticks(windows), on_exhausted=open_when_exhausted(verifier))
        daemon = make_daemon(collector, small, verifier, signer, clock)

        await run_to_end(daemon)

        opened = assert_complete_chain(verifier.stored, signer.public_key, windows)
        notices = [item for item in opened if item.payload_type == GAP_NOTICE_PAYLOAD_TYPE]
        assert notices, "the cap was meant to overflow"
        assert sorted(noticed) == [item.last for item in notices]
        for item in notices:
            notice = GapNotice.FromString(item.payload)
            gap = noticed[item.last]
            assert (notice.first_missing, notice.last_missing) == (gap.first, gap.last)
            assert notice.previous_envelope_sha256 == gap.previous_sha256
            assert notice.last_missing_envelope_sha256 == gap.last_sha256
            assert (notice.agent_id, notice.key_id) == (AGENT_ID, signer.key_id)
        dropped = sum(item.last - item.first + 1 for item in notices)
        assert small.stats().dropped_total == dropped
        assert len(opened) == windows - dropped + len(notices)
        assert small.acked_sequence() == windows


# ---- nonces ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NonceCase:
    nonce_lifetime_s: float
    backlog: bool  # an undelivered envelope from an earlier run is waiting in the spool
    bound_to: int | None  # the sequence expected to carry the nonce


NONCE_CASES = {
    "caught-up-and-fresh": NonceCase(60.0, backlog=False, bound_to=1),
    "expires-within-a-window": NonceCase(WINDOW_S / 2, backlog=False, bound_to=None),
    "expires-just-after-a-window": NonceCase(WINDOW_S * 1.5, backlog=False, bound_to=1),
    "behind-the-verifier": NonceCase(60.0, backlog=True, bound_to=None),
}


def spool_backlog(spool: Spool, signer: Ed25519Signer) -> None:
    claims = WindowClaims(
        start_unix_s=T0 - WINDOW_S,
        end_unix_s=T0,
        host=HOST,
        gpus=(),
        raw_samples=b"",
        source="replay",
    )
    evidence = build_evidence(
        claims,
        agent_id=AGENT_ID,
        key_id=signer.key_id,
        sequence=1,
        previous_sha256=GENESIS_HASH,
        created_unix_ns=round(NOW_S * NS_PER_S),
    )
    spool.append(1, sign_evidence(evidence, signer), claims.raw_samples)


@pytest.mark.parametrize("case", NONCE_CASES.values(), ids=NONCE_CASES.keys())
async def test_nonce_is_bound_only_when_caught_up_and_not_about_to_expire(
    case: NonceCase,
    spool: Spool,
    verifier: FakeVerifier,
    signer: Ed25519Signer,
    clock: FakeClock,
) -> None:
    if case.backlog:
        spool_backlog(spool, signer)
    expires_ns = round((NOW_S + case.nonce_lifetime_s) * NS_PER_S)
    verifier.challenge_response = ChallengeResponse(
        nonce=b"synthetic-nonce", expires_unix_ns=expires_ns
    )
    # Acknowledge nothing until every window is sealed, so "caught up" cannot change mid-run.
    verifier.gate = asyncio.Event()
    collector = ListCollector(
        replay_ticks(4),
        on_exhausted=open_when_exhausted(verifier),
        host_gate=verifier.challenged,  # sample only once the nonce is in hand
    )
    options = dataclasses.replace(REPLAY, challenge_interval_s=3600.0)
    daemon = make_daemon(collector, spool, verifier, signer, clock, options)

    await run_to_end(daemon)

    windows = 5 if case.backlog else 4
    opened = assert_complete_chain(verifier.stored, signer.public_key, windows)
    carrying = [evidence_of(i).sequence for i in opened if evidence_of(i).nonce]
    assert carrying == ([] if case.bound_to is None else [case.bound_to])
    if case.bound_to is not None:
        assert evidence_of(opened[case.bound_to - 1]).nonce == b"synthetic-nonce"


async def test_failed_challenge_leaves_evidence_without_nonce(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    verifier.challenge_response = unavailable()
    collector = ListCollector(replay_ticks(3), host_gate=verifier.challenged)
    options = dataclasses.replace(REPLAY, challenge_interval_s=3600.0)
    daemon = make_daemon(collector, spool, verifier, signer, clock, options)

    await run_to_end(daemon)

    opened = assert_complete_chain(verifier.stored, signer.public_key, 3)
    assert all(evidence_of(item).nonce == b"" for item in opened)


# ---- stopping ----------------------------------------------------------------------------

LIVE = DaemonOptions(
    window_s=10.0,  # longer than the test runs: only a partial window can be sealed
    sample_interval_s=0.005,
    replay_speed=None,
    challenge_interval_s=0,
)


async def start_live(
    daemon: AgentDaemon, collector: LiveCollector, shutdown_grace_s: float
) -> None:
    """Run live until a few ticks were read, then stop and wait for the daemon to return."""
    task = asyncio.create_task(daemon.run(shutdown_grace_s))

    async def some_ticks_read() -> None:
        while collector.reads < 5 and not task.done():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(some_ticks_read(), RUN_TIMEOUT_S)
    daemon.stop()
    await asyncio.wait_for(task, RUN_TIMEOUT_S)


async def test_stop_while_live_seals_and_delivers_the_partial_window(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    clock.now = T0 + 0.5
    collector = LiveCollector(clock, LIVE.sample_interval_s)
    daemon = make_daemon(collector, spool, verifier, signer, clock, LIVE)

    await start_live(daemon, collector, shutdown_grace_s=RUN_TIMEOUT_S / 2)

    assert daemon.stats.windows_sealed == 1
    (item,) = assert_complete_chain(verifier.stored, signer.public_key, 1)
    evidence = evidence_of(item)
    assert [g.sample_count for g in evidence.gpus] == [collector.reads, collector.reads]
    assert evidence.window_start_unix_ns == round(T0 * NS_PER_S)
    assert evidence.source == "nvml"
    assert spool.acked_sequence() == 1


async def test_stop_returns_after_the_grace_period_when_the_verifier_hangs(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    verifier.gate = asyncio.Event()  # never opened: every submit hangs
    collector = LiveCollector(clock, LIVE.sample_interval_s)
    daemon = make_daemon(collector, spool, verifier, signer, clock, LIVE)

    await start_live(daemon, collector, shutdown_grace_s=0.1)

    assert daemon.stats.windows_sealed == 1
    assert verifier.stored == {}
    assert spool.acked_sequence() == 0
    assert [item.sequence for item in spool.pending(0, 10)] == [1]


async def test_sampler_crash_in_a_replay_is_raised_after_delivering_what_was_sealed(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    collector = ListCollector(replay_ticks(2), crash=COLLECTOR_FAILURE)
    daemon = make_daemon(collector, spool, verifier, signer, clock)

    with pytest.raises(RuntimeError, match="synthetic collector failure"):
        await run_to_end(daemon)

    assert daemon.stats.windows_sealed == 2
    assert_complete_chain(verifier.stored, signer.public_key, 2)


async def test_sampler_crash_while_live_stops_the_daemon_instead_of_idling(
    spool: Spool, verifier: FakeVerifier, signer: Ed25519Signer, clock: FakeClock
) -> None:
    collector = LiveCollector(clock, LIVE.sample_interval_s, crash_after=5)
    daemon = make_daemon(collector, spool, verifier, signer, clock, LIVE)

    with pytest.raises(RuntimeError, match="synthetic collector failure"):
        await run_to_end(daemon)

    (item,) = assert_complete_chain(verifier.stored, signer.public_key, 1)
    assert [g.sample_count for g in evidence_of(item).gpus] == [5, 5]
