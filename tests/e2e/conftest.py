"""A real verifier on a loopback port with a real SQLite file, and real enrolled agents."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.client import VerifierClient
from proto.limits import WireLimits
from proto.signing import Ed25519Signer
from server.serve import RunningVerifier, start_verifier
from server.settings import VerifierSettings
from server.store import Store

NS_PER_S = 1_000_000_000
# Small enough that oversize tests send little data; large enough for real windows.
TEST_LIMITS = WireLimits(max_envelope_bytes=64 * 1024, max_envelopes_per_batch=16)


@dataclass
class SteppableClock:
    """Real wall time plus an offset a test can step forward (to expire nonces)."""

    offset_ns: int = 0

    def __call__(self) -> int:
        return time.time_ns() + self.offset_ns


@dataclass
class LiveVerifier:
    """A started verifier, its store and a client channel to it."""

    running: RunningVerifier
    store: Store
    db_url: str
    address: str
    channel: grpc.aio.Channel
    clock: SteppableClock

    @property
    def client(self) -> VerifierClient:
        return VerifierClient(self.channel)

    def new_token(self, hostname: str = "") -> str:
        token = hashlib.sha256(f"{hostname}{time.time_ns()}".encode()).hexdigest()
        now = time.time_ns()
        self.store.add_enrol_token(
            hashlib.sha256(token.encode()).digest(), hostname, now + 60 * NS_PER_S, now
        )
        return token

    async def enroll(self, hostname: str = "host-a") -> tuple[str, Ed25519Signer]:
        signer = Ed25519Signer.generate()
        response = await self.client.enroll(
            self.new_token(hostname), signer.public_key.raw, hostname
        )
        return response.agent_id, signer


@pytest.fixture
async def live_verifier(tmp_path: Path) -> AsyncIterator[LiveVerifier]:
    db_url = f"sqlite:///{tmp_path / 'verifier.db'}"
    store = Store.open(db_url)
    settings = VerifierSettings(listen="127.0.0.1:0", db_url=db_url, insecure_plaintext=True)
    clock = SteppableClock()
    running = await start_verifier(settings, store, clock=clock, limits=TEST_LIMITS)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    )
    try:
        yield LiveVerifier(running, store, db_url, address, channel, clock)
    finally:
        await channel.close()
        await running.stop(0)
        store.close()
