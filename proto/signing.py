"""Keys and signatures: Ed25519 behind a small Signer / public-key seam.

A TPM or KMS backend plugs in by implementing :class:`Signer`; everything else only sees
key ids and signature bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from proto.errors import KeyFileError, MalformedError

ED25519_PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_MODE = 0o600


def key_id_for(raw_public_key: bytes) -> str:
    """Key id: hex SHA-256 of the raw public key bytes (stable across encodings)."""
    return hashlib.sha256(raw_public_key).hexdigest()


class Signer(Protocol):
    """Anything that can sign bytes and name its key."""

    @property
    def key_id(self) -> str:
        """Hex id of the public key that verifies this signer's signatures."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Return a signature over exactly ``message``."""
        ...


@dataclass(frozen=True)
class PublicKey:
    """A verifying key with its id."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != ED25519_PUBLIC_KEY_BYTES:
            raise MalformedError(
                f"an Ed25519 public key has {ED25519_PUBLIC_KEY_BYTES} bytes, got {len(self.raw)}"
            )

    @property
    def key_id(self) -> str:
        """Hex SHA-256 of the raw key."""
        return key_id_for(self.raw)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's signature over ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class Ed25519Signer:
    """A software Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = PublicKey(
            private_key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> Ed25519Signer:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        """A deterministic key from a 32-byte seed (test vectors only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def key_id(self) -> str:
        """Hex id of this signer's public key."""
        return self.public_key.key_id

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature over ``message`` (deterministic by construction)."""
        return self._private_key.sign(message)

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by its owner only."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create with 0600 from the start so the key is never briefly world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_KEY_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.chmod(path, PRIVATE_KEY_MODE)

    @classmethod
    def load(cls, path: Path) -> Ed25519Signer:
        """Read a key written by :meth:`save`; refuse it if group or others can read it."""
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as exc:
            raise KeyFileError(f"no private key at {path}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"private key {path} has mode {stat.S_IMODE(mode):04o}; "
                f"it must not be accessible to group or others (chmod 600 {path})"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise KeyFileError(f"{path} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)
