"""Ed25519 keys: ids, files written private, files readable by others refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proto.errors import KeyFileError, MalformedError
from proto.signing import Ed25519Signer, PublicKey, key_id_for


def test_key_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.pem"
    Ed25519Signer.generate().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_saved_key_loads_with_same_id(tmp_path: Path) -> None:
    signer = Ed25519Signer.generate()
    signer.save(tmp_path / "k.pem")
    assert Ed25519Signer.load(tmp_path / "k.pem").key_id == signer.key_id


@pytest.mark.parametrize(
    "mode",
    [0o640, 0o604, 0o644, 0o660, 0o700 | 0o007],
    ids=["g+r", "o+r", "g+r,o+r", "g+rw", "o+rwx"],
)
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    Ed25519Signer.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Ed25519Signer.load(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["empty", "text", "bad-base64-body"],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError):
        Ed25519Signer.load(path)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no private key"):
        Ed25519Signer.load(tmp_path / "absent.pem")


def test_key_id_is_sha256_of_raw_key() -> None:
    signer = Ed25519Signer.from_seed(bytes(32))
    assert signer.key_id == key_id_for(signer.public_key.raw)
    assert len(signer.key_id) == 64


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_public_key_of_wrong_size_is_malformed(size: int) -> None:
    with pytest.raises(MalformedError):
        PublicKey(bytes(size))
