"""The store across PostgreSQL restarts: calls fail fast and retryably, nothing committed is lost.

These tests stop and start the session's PostgreSQL server (tests/conftest.py). The writer
below stands in for the verifier's ingest path at the Store level: it retries a batch on
StoreUnavailableError, like an agent resending what was not acknowledged, and counts a
batch as acknowledged only once store_accepted returned. (The same property over gRPC,
with real agents, is the service's own test.)
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import create_engine, text
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from server.records import AcceptedEnvelope, GpuVerdict
from server.store import Store, StoreUnavailableError
from server.store.engine import PoolOptions
from tests.conftest import PostgresServer

NOW = 1_700_000_000_000_000_000
SECOND = 1_000_000_000
WINDOW = 10 * SECOND
BATCH = 4
# Liveness bounds, not timings: a stuck writer fails the test instead of hanging it.
PATIENCE_S = 60.0
POOL = PoolOptions(size=2, max_overflow=0, timeout_s=5.0, connect_timeout_s=2)


def _envelope(sequence: int) -> AcceptedEnvelope:
    body = f"envelope agent-r/{sequence}".encode() + bytes(range(64))
    digest = hashlib.sha256(body).digest()
    start = NOW + sequence * WINDOW
    gpus = tuple(
        GpuVerdict(
            gpu_index=index,
            gpu_uuid=f"GPU-synthetic-{index}",
            start_unix_ns=start,
            end_unix_ns=start + WINDOW,
            sample_count=100,
            features={"power_mean_w": 300.0},
            verdict="training",
            confidence=0.9,
            model_version="model-test-1",
        )
        for index in range(2)
    )
    return AcceptedEnvelope(
        agent_id="agent-r",
        sequence=sequence,
        envelope=body,
        envelope_sha256=digest,
        chain_head_sha256=digest,
        payload_type="application/vnd.gpuattest.evidence.v1+protobuf",
        received_unix_ns=start + SECOND,
        window_start_unix_ns=start,
        window_end_unix_ns=start + WINDOW,
        source="synthetic-replay",
        nonce=b"",
        gpus=gpus,
    )


@dataclass
class Writer:
    """Stores batches of consecutive envelopes in a thread, retrying each until acknowledged."""

    store: Store
    acknowledged: list[int] = field(default_factory=list)  # sequences store_accepted returned
    failures: int = 0
    error: BaseException | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(PATIENCE_S)
        assert not self._thread.is_alive(), "the writer hung"
        if self.error is not None:
            raise self.error

    def wait_for_acknowledged(self, more_than: int) -> None:
        """Block until more than ``more_than`` envelopes are acknowledged in all."""
        self._wait_until(f"{more_than} acknowledged", lambda: len(self.acknowledged) > more_than)

    def wait_for_failures(self, more_than: int) -> None:
        """Block until more than ``more_than`` attempts failed in all."""
        self._wait_until(f"{more_than} failures", lambda: self.failures > more_than)

    def _wait_until(self, what: str, condition: Callable[[], bool]) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: condition() or self.error is not None, PATIENCE_S)
        if self.error is not None:
            raise self.error
        assert done, f"the writer never got past {what}"

    def _run(self) -> None:
        sequence = 1
        try:
            while not self._stop.is_set():
                batch = [_envelope(s) for s in range(sequence, sequence + BATCH)]
                self._store_until_acknowledged(batch)
                with self._changed:
                    self.acknowledged.extend(e.sequence for e in batch)
                    self._changed.notify_all()
                sequence += BATCH
        except BaseException as error:  # handed to the test thread
            with self._changed:
                self.error = error
                self._changed.notify_all()

    def _store_until_acknowledged(self, batch: list[AcceptedEnvelope]) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(StoreUnavailableError),
            wait=wait_exponential(multiplier=0.02, max=0.25),
            stop=stop_after_delay(PATIENCE_S),
            before_sleep=lambda _state: self._count_failure(),
            reraise=True,
        )
        retrying(self.store.store_accepted, batch)

    def _count_failure(self) -> None:
        with self._changed:
            self.failures += 1
            self._changed.notify_all()


@pytest.fixture
def store(postgres_store_url: str, postgres_server: PostgresServer) -> Iterator[Store]:
    with Store.open(postgres_store_url, POOL) as opened:
        token = hashlib.sha256(b"token-r").digest()
        opened.add_enrol_token(token, "host-r", NOW + 3600 * SECOND, NOW)
        opened.enroll(token, "host-r", "agent-r", b"public-key-r", "key-r", NOW)
        yield opened
    if not postgres_server.is_running():
        postgres_server.start()


def _stored_sequences(url: str) -> list[int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            envelopes = conn.execute(
                text("SELECT sequence FROM envelopes WHERE agent_id = 'agent-r' ORDER BY sequence")
            ).scalars()
            return list(envelopes)
    finally:
        engine.dispose()


def _stored_window_count(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            count: int = conn.execute(text("SELECT count(*) FROM gpu_windows")).scalar_one()
            return count
    finally:
        engine.dispose()


def test_calls_fail_fast_while_postgresql_is_down_and_work_once_it_is_back(
    store: Store, postgres_server: PostgresServer
) -> None:
    store.store_accepted([_envelope(1)])

    postgres_server.stop("fast")
    assert store.ping() is False
    with pytest.raises(StoreUnavailableError):
        store.agent_state("agent-r")
    with pytest.raises(StoreUnavailableError):
        store.store_accepted([_envelope(2)])
    postgres_server.start()

    # The pooled connections died with the server; pre-ping replaces them unnoticed.
    assert store.ping() is True
    assert store.store_accepted([_envelope(2)]) == 1
    state = store.agent_state("agent-r")
    assert state is not None
    assert state.acked_sequence == 2


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["clean-stop", "crash"])
def test_no_acknowledged_batch_is_lost_when_postgresql_restarts(
    store: Store, postgres_server: PostgresServer, postgres_store_url: str, mode: str
) -> None:
    writer = Writer(store)
    writer.start()
    try:
        for _restart in range(2):
            writer.wait_for_acknowledged(more_than=len(writer.acknowledged))
            failures = writer.failures
            postgres_server.stop(mode)  # open transactions break, commits in flight are cut
            writer.wait_for_failures(more_than=failures)
            postgres_server.start()
        writer.wait_for_acknowledged(more_than=len(writer.acknowledged) + 2 * BATCH)
    finally:
        writer.stop()

    stored = _stored_sequences(postgres_store_url)
    # Every acknowledged envelope is there, once, and nothing the writer did not send.
    assert stored == writer.acknowledged == list(range(1, len(writer.acknowledged) + 1))
    assert _stored_window_count(postgres_store_url) == 2 * len(stored)
    state = store.agent_state("agent-r")
    assert state is not None
    assert state.acked_sequence == stored[-1]
