"""The agent's identity on disk: its private key and what enrolment returned."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.client import VerifierClient
from proto.errors import GpuattestError
from proto.signing import Ed25519Signer

KEY_FILE = "agent-key.pem"
IDENTITY_FILE = "identity.json"


class NotEnrolledError(GpuattestError):
    """The agent has no identity yet: run `gpuattest agent enroll`."""


class AlreadyEnrolledError(GpuattestError):
    """The state folder already holds an identity; a new one would orphan its spool."""


@dataclass(frozen=True)
class Identity:
    """Who the verifier knows this agent as."""

    agent_id: str
    key_id: str
    hostname: str
    verifier: str


def default_hostname() -> str:
    """The OS host name (what the verifier binds the key to by default)."""
    return socket.gethostname()


async def enroll(
    client: VerifierClient, state_dir: Path, token: str, hostname: str, verifier: str
) -> Identity:
    """Create a key (0600), enrol it with the one-time token, save the identity.

    Refuses a state folder that already has an identity: its spool holds evidence signed
    by the old key and chained from the old sequence, which a new identity cannot send.
    """
    if (state_dir / IDENTITY_FILE).exists():
        raise AlreadyEnrolledError(
            f"{state_dir} already holds an enrolled identity; enrol into a new --state-dir"
        )
    signer = Ed25519Signer.generate()
    response = await client.enroll(token, signer.public_key.raw, hostname)
    if response.key_id != signer.key_id:
        raise GpuattestError("verifier acknowledged a different key than the one presented")
    signer.save(state_dir / KEY_FILE)
    identity = Identity(response.agent_id, response.key_id, hostname, verifier)
    _write_json(state_dir / IDENTITY_FILE, asdict(identity))
    return identity


def load_identity(state_dir: Path) -> tuple[Identity, Ed25519Signer]:
    """Read the saved identity and key; the key file must be private to its owner."""
    path = state_dir / IDENTITY_FILE
    if not path.is_file():
        raise NotEnrolledError(f"no {IDENTITY_FILE} in {state_dir}: run `gpuattest agent enroll`")
    identity = Identity(**json.loads(path.read_text()))
    signer = Ed25519Signer.load(state_dir / KEY_FILE)
    if signer.key_id != identity.key_id:
        raise GpuattestError(f"{KEY_FILE} does not match the enrolled key {identity.key_id}")
    return identity, signer


def _write_json(path: Path, content: dict[str, str]) -> None:
    # Write then rename so a crash never leaves a half-written identity.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)
