"""The verifier's ingest path: Submit calls appraised in groups and committed together.

Why groups: a transaction (and an fsync) per Submit call, and two database reads per call
before appraisal, cost more than appraising the evidence. Here concurrent Submit calls
queue; a coordinator on the event loop takes a group of them, one worker thread reads the
keys and chain states of the whole group in one query and appraises it, and another thread
commits every accepted envelope of the group in one transaction while the next group is
appraised. Each call is answered only after the transaction holding its envelopes
committed: nothing is acknowledged that is not stored.

Ordering: an agent never has two calls in the pipeline at once (a call waits in the queue
while an earlier call signed by the same key, or naming the same agent, is being appraised
or committed), so every appraisal starts from the chain state its predecessor committed.

Backpressure: the queue is bounded by envelopes. A call that would overflow it is refused
at once with :class:`Overloaded`, carrying a retry hint from the recent commit rate,
instead of holding memory and a deadline it could not meet.

Outage: when the database fails a read or a commit, the calls of that group are answered
with :class:`StoreUnavailable` (nothing acknowledged), the ``on_store_down`` callback fires
(the server reports NOT_SERVING and probes the database until it answers) and new calls
are refused with :class:`StoreUnavailable` until :meth:`IngestPipeline.store_is_back`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from proto.envelope_pb2 import Envelope
from proto.errors import GpuattestError
from proto.limits import WireLimits
from server import appraisal
from server.appraisal import AppraisalError, AppraisalPolicy
from server.classify import Classifier
from server.records import AcceptedEnvelope, AgentState, GapRecord, KeyRecord, NonceRecord
from server.store import Store, StoreError, StoreUnavailableError

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # wall-clock nanoseconds since the Unix epoch
# A commit the database broke off (a deadlock between replicas, a dropped connection) is
# tried again a few times before the calls are answered as unavailable; it is idempotent.
COMMIT_ATTEMPTS = 3
COMMIT_RETRY_WAIT_S = 0.05
# Namespaces of the names a call holds while in flight.
_KEY = "key:"
_AGENT = "agent:"


class Overloaded(GpuattestError):  # noqa: N818 - the reason the client sees is "overloaded"
    """The ingest queue is full: the caller should retry after ``retry_after_ms``."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"ingest queue full; retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class StoreUnavailable(GpuattestError):  # noqa: N818 - the reason is "store_unavailable"
    """The database could not appraise or commit this call; nothing from it was stored."""


@dataclass(frozen=True)
class IngestOptions:
    """Sizes of the ingest pipeline (see :class:`server.settings.VerifierSettings`)."""

    # Envelopes admitted and not yet answered; beyond it calls are refused as overloaded.
    max_pending_envelopes: int = 8192
    # Refuse sooner when the queue would take longer than this to drain at the recent
    # commit rate: a call answered after its agent's deadline helps nobody.
    max_queue_delay_ms: int = 100
    # Never refused for the delay while fewer are pending: enough for the groups being
    # appraised and committed and the next one, so the pipeline never runs dry (and a
    # cold start, with no rate yet, is let in).
    min_admitted_envelopes: int = 192
    # Envelopes appraised and committed together at most; bounds the latency of a group.
    max_group_envelopes: int = 64
    # Threads appraising the calls of a group side by side (1: the group's own thread).
    appraisal_threads: int = 1
    retry_after_min_ms: int = 50
    retry_after_max_ms: int = 5000


class IngestCounters:
    """Accepted, duplicate and rejected envelopes, exported to Prometheus and GetStats."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self.rejections: dict[tuple[str, str], int] = {}
        self.accepted = 0
        self.duplicates = 0
        self._rejected = Counter(
            "gpuattest_verifier_rejections",
            "Envelopes and requests rejected, by reason and gRPC status",
            ["reason", "code"],
            registry=registry,
        )
        self._accepted = Counter(
            "gpuattest_verifier_envelopes_accepted", "Envelopes newly stored", registry=registry
        )
        self._duplicates = Counter(
            "gpuattest_verifier_envelopes_duplicate",
            "Envelopes already stored, acknowledged again",
            registry=registry,
        )
        self.pending = Gauge(
            "gpuattest_verifier_ingest_pending_envelopes",
            "Envelopes admitted to the ingest pipeline and not yet answered",
            registry=registry,
        )
        self.group_envelopes = Histogram(
            "gpuattest_verifier_commit_group_envelopes",
            "Envelopes appraised and committed in one transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )

    def reject(self, reason: str, code: str) -> None:
        """Count one rejection."""
        with self._lock:
            self.rejections[(reason, code)] = self.rejections.get((reason, code), 0) + 1
        self._rejected.labels(reason=reason, code=code).inc()

    def accept(self, accepted: int, duplicates: int) -> None:
        """Count stored and duplicate envelopes of one call."""
        with self._lock:
            self.accepted += accepted
            self.duplicates += duplicates
        self._accepted.inc(accepted)
        self._duplicates.inc(duplicates)


@dataclass
class IngestOutcome:
    """What one Submit call did."""

    agent_id: str = ""
    accepted: list[AcceptedEnvelope] = field(default_factory=list)
    duplicates: int = 0
    rejection: AppraisalError | None = None
    acked_sequence: int | None = None


@dataclass(frozen=True)
class GroupSnapshot:
    """What a group of calls needs to know, read in one query: keys and chain states."""

    keys: Mapping[str, KeyRecord | None]  # None: asked for, not enrolled
    states: Mapping[str, AgentState]  # by agent id

    @classmethod
    def read(cls, store: Store, key_ids: Collection[str]) -> GroupSnapshot:
        """The enrolled keys among ``key_ids`` and their agents' chain states."""
        found = store.keys_with_chain_states(key_ids)
        keys: dict[str, KeyRecord | None] = dict.fromkeys(key_ids)
        keys.update((key_id, key) for key_id, (key, _) in found.items())
        return cls(keys, {state.agent_id: state for _, state in found.values()})


class SubmissionContext:
    """AppraisalContext for one call: the group's snapshot, then what the call accepted.

    Reads the snapshot first and the store only for what it lacks (a key or agent the
    snapshot does not name, stored hashes of duplicates, nonces), so an ordinary call
    costs no query of its own.
    """

    def __init__(self, store: Store, snapshot: GroupSnapshot | None = None) -> None:
        self._store = store
        self._snapshot = snapshot or GroupSnapshot({}, {})
        # This call's own view: what it accepted, and what it had to read itself.
        self._keys: dict[str, KeyRecord | None] = {}
        self._states: dict[str, AgentState] = {}
        self._hashes: dict[tuple[str, int], bytes] = {}
        self._used_nonces: set[bytes] = set()

    def key(self, key_id: str) -> KeyRecord | None:
        if key_id in self._snapshot.keys:
            return self._snapshot.keys[key_id]
        if key_id not in self._keys:
            self._keys[key_id] = self._store.key(key_id)
        return self._keys[key_id]

    def agent_state(self, agent_id: str) -> AgentState | None:
        state = self._states.get(agent_id) or self._snapshot.states.get(agent_id)
        if state is None:
            state = self._store.agent_state(agent_id)
            if state is not None:
                self._states[agent_id] = state
        return state

    def stored_sha256(self, agent_id: str, sequence: int) -> bytes | None:
        pending = self._hashes.get((agent_id, sequence))
        return pending or self._store.stored_envelope_sha256(agent_id, sequence)

    def nonce(self, nonce: bytes) -> NonceRecord | None:
        record = self._store.nonce(nonce)
        if record is not None and nonce in self._used_nonces:
            return replace(record, used=True)
        return record

    def accept(self, record: AcceptedEnvelope) -> None:
        """Make later envelopes of the call see ``record`` as stored."""
        self._states[record.agent_id] = AgentState(
            record.agent_id, record.sequence, record.chain_head_sha256
        )
        self._hashes[(record.agent_id, record.sequence)] = record.envelope_sha256
        if record.nonce:
            self._used_nonces.add(record.nonce)


def appraise_submission(
    envelopes: Sequence[bytes],
    context: SubmissionContext,
    classifier: Classifier,
    policy: AppraisalPolicy,
    now_unix_ns: int,
) -> IngestOutcome:
    """Appraise one call's envelopes in order, up to the first rejection (no I/O of its own)."""
    outcome = IngestOutcome()
    for envelope in envelopes:
        try:
            result = appraisal.appraise(envelope, context, classifier, policy, now_unix_ns)
        except AppraisalError as exc:
            outcome.rejection = exc
            outcome.agent_id = outcome.agent_id or exc.agent_id
            break
        if isinstance(result, appraisal.Accepted):
            outcome.agent_id = outcome.agent_id or result.record.agent_id
            context.accept(result.record)
            outcome.accepted.append(result.record)
        else:
            outcome.agent_id = outcome.agent_id or result.agent_id
            outcome.duplicates += 1
    if outcome.agent_id:
        # Where the chain stands once this call's envelopes are committed.
        state = context.agent_state(outcome.agent_id)
        outcome.acked_sequence = state.acked_sequence if state else None
    return outcome


def signing_key_ids(envelopes: Iterable[bytes], limits: WireLimits) -> frozenset[str]:
    """Key ids the envelopes' signatures name; what cannot be parsed names none.

    Only a hint for ordering and prefetching: appraisal parses and checks everything again.
    """
    key_ids: set[str] = set()
    for envelope_bytes in envelopes:
        if len(envelope_bytes) > limits.max_envelope_bytes:
            continue
        try:
            envelope = Envelope.FromString(envelope_bytes)
        except DecodeError:
            continue
        key_ids.update(signature.keyid for signature in envelope.signatures)
    return frozenset(key_ids)


@dataclass(eq=False)
class _Call:
    """One Submit call waiting in, or moving through, the pipeline."""

    envelopes: list[bytes]
    key_ids: frozenset[str]
    future: asyncio.Future[IngestOutcome]
    agents: frozenset[str] = frozenset()  # known once appraised (or deferred) once
    held: frozenset[str] = frozenset()  # names this call holds in the busy set now

    def names(self) -> frozenset[str]:
        """What the call holds while in flight: its signing keys and, once known, agents."""
        return frozenset(_KEY + k for k in self.key_ids) | frozenset(
            _AGENT + a for a in self.agents
        )


@dataclass
class _Appraised:
    """A group after appraisal: outcomes to commit, calls to put back in the queue."""

    done: list[tuple[_Call, IngestOutcome]] = field(default_factory=list)
    deferred: list[_Call] = field(default_factory=list)


class _CommitRate:
    """Envelopes committed per second, smoothed, for the retry hint of refused calls."""

    def __init__(self, half_life_s: float = 2.0) -> None:
        self._half_life_s = half_life_s
        self._rate = 0.0
        self._last = time.monotonic()

    def add(self, envelopes: int) -> None:
        now = time.monotonic()
        elapsed = max(now - self._last, 1e-3)
        weight = 0.5 ** (elapsed / self._half_life_s)
        self._rate = weight * self._rate + (1 - weight) * envelopes / elapsed
        self._last = now

    @property
    def per_s(self) -> float:
        return self._rate


class IngestPipeline:
    """Queue, appraise in groups, commit in groups; answer each call after its commit."""

    def __init__(
        self,
        store: Store,
        classifier: Classifier,
        policy: AppraisalPolicy,
        clock: Clock,
        counters: IngestCounters,
        options: IngestOptions | None = None,
        on_store_down: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._classifier = classifier
        self._policy = policy
        self._clock = clock
        self._counters = counters
        self._options = options or IngestOptions()
        self._on_store_down = on_store_down
        self._queue: deque[_Call] = deque()
        self._pending_envelopes = 0
        # Key ids and agents of calls being appraised or committed.
        self._busy_names: set[str] = set()
        self._wake = asyncio.Event()
        self._to_commit: asyncio.Queue[list[tuple[_Call, IngestOutcome]]] = asyncio.Queue(1)
        self._appraiser = ThreadPoolExecutor(1, thread_name_prefix="ingest-appraise")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="ingest-commit")
        threads = self._options.appraisal_threads
        self._shards = (
            ThreadPoolExecutor(threads, thread_name_prefix="ingest-shard") if threads > 1 else None
        )
        self._rate = _CommitRate()
        self._store_up = True
        self._in_flight: set[_Call] = set()  # taken from the queue, not yet answered
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the appraisal and commit loops on the running event loop."""
        self._tasks = [
            asyncio.create_task(self._appraise_loop(), name="ingest-appraise"),
            asyncio.create_task(self._commit_loop(), name="ingest-commit"),
        ]

    async def stop(self) -> None:
        """Stop the loops, answer queued calls as unavailable, wait for worker threads."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        stopping = StoreUnavailable("the verifier is stopping")
        for call in [*self._queue, *self._in_flight]:
            self._finish(call, stopping)
        self._queue.clear()
        # A thread may still be inside a transaction: let it end before the store closes.
        for executor in (self._appraiser, self._committer, self._shards):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, wait=True)

    @property
    def pending_envelopes(self) -> int:
        """Envelopes admitted and not yet answered."""
        return self._pending_envelopes

    def store_is_back(self) -> None:
        """The database answers again: admit calls once more."""
        self._store_up = True

    async def submit(self, envelopes: list[bytes]) -> IngestOutcome:
        """Appraise and store one call's envelopes; return once they are committed.

        Raises :class:`Overloaded` when the queue is full and :class:`StoreUnavailable`
        when the database failed (nothing of the call was stored then). Rejections by
        appraisal are not raised: they are in the outcome, with what was stored before.
        """
        if not self._store_up:
            raise StoreUnavailable("the database is unreachable")
        # An empty pipeline takes any call, however large, so no batch waits forever.
        pending = self._pending_envelopes
        if pending and pending + len(envelopes) > self._admission_limit():
            raise Overloaded(self._retry_after_ms())
        call = _Call(
            envelopes,
            signing_key_ids(envelopes, self._policy.limits),
            asyncio.get_running_loop().create_future(),
        )
        self._admit(call)
        # If the caller goes away, the future is cancelled with it; a call still queued is
        # then dropped, one already appraised is committed all the same (it is idempotent).
        return await call.future

    def _admit(self, call: _Call) -> None:
        self._queue.append(call)
        self._pending_envelopes += len(call.envelopes)
        self._counters.pending.set(self._pending_envelopes)
        self._wake.set()

    def _admission_limit(self) -> int:
        options = self._options
        drains_in_time = round(self._rate.per_s * options.max_queue_delay_ms / 1000)
        by_delay = max(options.min_admitted_envelopes, drains_in_time)
        return min(options.max_pending_envelopes, by_delay)

    def _retry_after_ms(self) -> int:
        # The time the queue takes to drain; callers back off further on repeated refusals.
        rate = max(self._rate.per_s, 1.0)
        wanted = round(1000 * self._pending_envelopes / rate)
        return max(self._options.retry_after_min_ms, min(self._options.retry_after_max_ms, wanted))

    # ---- the coordinator (event loop) ----

    def _take_group(self) -> list[_Call]:
        """The oldest calls whose agents have nothing in flight, up to the group size.

        A call waiting on a busy name also holds back later calls naming it, so calls of
        one agent always go through in the order they arrived.
        """
        group: list[_Call] = []
        envelopes = 0
        blocked = set(self._busy_names)
        kept: deque[_Call] = deque()
        while self._queue:
            call = self._queue[0]
            if group and envelopes + len(call.envelopes) > self._options.max_group_envelopes:
                break
            self._queue.popleft()
            if call.future.cancelled():
                self._release(call, held=False)
                continue
            names = call.names()
            if names & blocked:
                blocked |= names
                kept.append(call)
                continue
            blocked |= names
            self._hold(call)
            self._in_flight.add(call)
            group.append(call)
            envelopes += len(call.envelopes)
        kept.extend(self._queue)
        self._queue = kept
        return group

    async def _appraise_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = self._take_group()
            if not group:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Agents of calls appraised but not committed: their stored state is stale.
            taken = set(group)
            in_flight = frozenset(
                agent for call in self._in_flight - taken for agent in call.agents
            )
            try:
                appraised = await loop.run_in_executor(
                    self._appraiser, self._appraise_group, group, in_flight
                )
            except Exception as error:
                self._fail(group, error)
                continue
            for call in reversed(appraised.deferred):
                self._busy_names -= call.held
                call.held = frozenset()
                self._in_flight.discard(call)
                self._queue.appendleft(call)
            for call, _ in appraised.done:
                self._hold(call)  # now with its agents
            if appraised.done:
                await self._to_commit.put(appraised.done)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            done = await self._to_commit.get()
            outcomes = [outcome for _, outcome in done]
            try:
                errors = await loop.run_in_executor(self._committer, self._commit, outcomes)
            except Exception as error:
                self._fail([call for call, _ in done], error)
                continue
            self._rate.add(sum(len(call.envelopes) for call, _ in done))
            self._counters.group_envelopes.observe(sum(len(c.envelopes) for c, _ in done))
            for (call, outcome), failure in zip(done, errors, strict=True):
                if failure is None:
                    self._count(outcome)
                    self._finish(call, outcome)
                else:
                    self._finish(call, StoreUnavailable(str(failure)))

    def _finish(self, call: _Call, result: IngestOutcome | BaseException) -> None:
        self._release(call, held=call in self._in_flight)
        if call.future.done():
            return
        if isinstance(result, BaseException):
            call.future.set_exception(result)
        else:
            call.future.set_result(result)

    def _hold(self, call: _Call) -> None:
        call.held = call.names()
        self._busy_names |= call.held

    def _release(self, call: _Call, *, held: bool) -> None:
        if held:
            self._busy_names -= call.held
            call.held = frozenset()
            self._in_flight.discard(call)
        self._pending_envelopes -= len(call.envelopes)
        self._counters.pending.set(self._pending_envelopes)
        self._wake.set()

    def _fail(self, calls: Iterable[_Call], error: BaseException) -> None:
        log.error("the store failed; nothing of this group is acknowledged: %s", error)
        if self._store_up:
            self._store_up = False
            self._on_store_down()
        for call in calls:
            self._finish(call, StoreUnavailable(str(error)))

    def _count(self, outcome: IngestOutcome) -> None:
        self._counters.accept(len(outcome.accepted), outcome.duplicates)
        if outcome.rejection:
            rejection = outcome.rejection
            log.warning("rejected envelope: %s (%s)", rejection, rejection.code)
            self._counters.reject(rejection.reason, rejection.code)

    # ---- worker threads ----

    def _appraise_group(self, group: Sequence[_Call], in_flight: frozenset[str]) -> _Appraised:
        snapshot = GroupSnapshot.read(self._store, {k for call in group for k in call.key_ids})
        now = self._clock()
        claimed: set[str] = set()
        appraised = _Appraised()
        ready: list[_Call] = []
        for call in group:
            call.agents = frozenset(
                key.agent_id for k in call.key_ids if (key := snapshot.keys.get(k)) is not None
            )
            if call.agents & claimed or call.agents & in_flight:
                # Another key of the same agent got there first (key rotation): wait for it.
                appraised.deferred.append(call)
                continue
            claimed |= call.agents
            ready.append(call)

        def appraise(call: _Call) -> IngestOutcome:
            context = SubmissionContext(self._store, snapshot)
            return appraise_submission(call.envelopes, context, self._classifier, self._policy, now)

        # Calls of different agents are independent; signature checks release the GIL.
        outcomes = self._shards.map(appraise, ready) if self._shards else map(appraise, ready)
        appraised.done.extend(zip(ready, outcomes, strict=True))
        return appraised

    def _commit(self, outcomes: Sequence[IngestOutcome]) -> list[BaseException | None]:
        """Commit the group in one transaction; per call only if the rows clash.

        Returns each call's error (None: committed). Raises when the database failed.
        """
        try:
            self._store_with_retries([r for outcome in outcomes for r in outcome.accepted])
        except StoreError as error:
            if len(outcomes) == 1:
                log.error("storing a call's evidence failed; none of it acknowledged: %s", error)
                return [error]
            # One call's rows clash with the schema: commit the others without it.
            return [self._commit_alone(outcome) for outcome in outcomes]
        for outcome in outcomes:
            _record_observed_gap(self._store, outcome)
        return [None] * len(outcomes)

    def _commit_alone(self, outcome: IngestOutcome) -> BaseException | None:
        try:
            self._store_with_retries(outcome.accepted)
        except StoreError as error:
            log.error("storing a call's evidence failed; none of it acknowledged: %s", error)
            return error
        _record_observed_gap(self._store, outcome)
        return None

    def _store_with_retries(self, accepted: list[AcceptedEnvelope]) -> None:
        # Sorted, so replicas committing overlapping groups lock rows in the same order
        # and wait for each other instead of deadlocking.
        ordered = sorted(accepted, key=lambda record: (record.agent_id, record.sequence))
        for attempt in Retrying(
            retry=retry_if_exception_type(StoreUnavailableError),
            wait=wait_exponential(multiplier=COMMIT_RETRY_WAIT_S, max=1.0),
            stop=stop_after_attempt(COMMIT_ATTEMPTS),
            reraise=True,
        ):
            with attempt:
                self._store.store_accepted(ordered)


def _record_observed_gap(store: Store, outcome: IngestOutcome) -> None:
    gap: GapRecord | None = outcome.rejection.observed_gap if outcome.rejection else None
    if gap is not None:
        store.record_gap(gap)
