"""DSSE-style envelopes: sign PAE(payload_type, payload), verify, hand back the exact bytes.

``verify`` raises an :class:`~proto.errors.EnvelopeError` or returns the verified payload
bytes; callers parse the payload only after that (never before, never re-encoded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from proto.envelope_pb2 import Envelope, Signature
from proto.errors import (
    LimitError,
    MalformedError,
    PayloadTypeError,
    SignatureError,
    UnknownKeyError,
)
from proto.limits import DEFAULT_LIMITS, WireLimits
from proto.signing import PublicKey, Signer

EVIDENCE_PAYLOAD_TYPE = "application/vnd.gpuattest.evidence.v1+protobuf"
GAP_NOTICE_PAYLOAD_TYPE = "application/vnd.gpuattest.gap.v1+protobuf"
GENESIS_HASH = bytes(32)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: binds the payload type into what is signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(payload_type: str, payload: bytes, signer: Signer) -> bytes:
    """Return the serialized Envelope carrying ``payload`` and one signature by ``signer``."""
    envelope = Envelope(
        payload_type=payload_type,
        payload=payload,
        signatures=[Signature(keyid=signer.key_id, sig=signer.sign(pae(payload_type, payload)))],
    )
    return envelope.SerializeToString(deterministic=True)


def envelope_sha256(envelope_bytes: bytes) -> bytes:
    """Hash that chains envelopes: SHA-256 over the exact serialized envelope."""
    return hashlib.sha256(envelope_bytes).digest()


def parse_envelope(envelope_bytes: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Envelope:
    """Parse envelope bytes, enforcing the size limit first."""
    if len(envelope_bytes) > limits.max_envelope_bytes:
        raise LimitError(
            f"envelope of {len(envelope_bytes)} bytes exceeds {limits.max_envelope_bytes}"
        )
    envelope = Envelope()
    try:
        envelope.ParseFromString(envelope_bytes)
    except DecodeError as exc:
        raise MalformedError(f"envelope does not parse: {exc}") from exc
    return envelope


@dataclass(frozen=True)
class VerifiedPayload:
    """What :func:`verify` hands back: the exact signed bytes and who signed them."""

    payload_type: str
    payload: bytes
    key_id: str


KeyLookup = Callable[[str], PublicKey | None]


def verify(
    envelope: Envelope,
    trusted_key: KeyLookup,
    expected_payload_types: frozenset[str],
) -> VerifiedPayload:
    """Check that a trusted key signed the envelope; return the verified payload bytes.

    ``trusted_key`` maps a key id to its public key, or None for an unknown id. The first
    signature whose key is known and verifies wins. Raises UnknownKeyError when no signature
    names a known key, SignatureError when none verifies (stripped or bad signatures) and
    PayloadTypeError for an unexpected type.
    """
    if not envelope.signatures:
        raise SignatureError("envelope carries no signature")
    message = pae(envelope.payload_type, envelope.payload)
    known = False
    for signature in envelope.signatures:
        key = trusted_key(signature.keyid)
        if key is None:
            continue
        known = True
        if key.verifies(signature.sig, message):
            # The type is checked only after authentication, so an attacker learns
            # nothing from the error they provoke with an unsigned envelope.
            if envelope.payload_type not in expected_payload_types:
                raise PayloadTypeError(f"unexpected payload type {envelope.payload_type!r}")
            return VerifiedPayload(envelope.payload_type, envelope.payload, signature.keyid)
    if not known:
        raise UnknownKeyError("no signature is by a known key")
    raise SignatureError("signature does not verify")
