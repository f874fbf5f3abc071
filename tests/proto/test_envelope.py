"""DSSE envelope: PAE, sign/verify, and every way a forged envelope must fail."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proto import envelope as dsse
from proto.envelope_pb2 import Envelope, Signature
from proto.errors import (
    LimitError,
    MalformedError,
    PayloadTypeError,
    SignatureError,
    UnknownKeyError,
)
from proto.limits import WireLimits
from proto.signing import Ed25519Signer, PublicKey

SIGNER = Ed25519Signer.from_seed(bytes(32))
OTHER = Ed25519Signer.from_seed(bytes([7]) * 32)
TYPES = frozenset({dsse.EVIDENCE_PAYLOAD_TYPE})


def trusted(*signers: Ed25519Signer) -> dict[str, PublicKey]:
    return {s.key_id: s.public_key for s in signers}


def test_pae_matches_dsse_specification_example() -> None:
    # Example from the DSSE protocol specification.
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_verify_returns_exact_payload_and_key() -> None:
    envelope_bytes = dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, b"\x00payload", SIGNER)
    verified = dsse.verify(dsse.parse_envelope(envelope_bytes), trusted(SIGNER).get, TYPES)
    assert verified.payload == b"\x00payload"
    assert verified.key_id == SIGNER.key_id


def _forge(name: str) -> tuple[Envelope, type[Exception]]:
    good = dsse.parse_envelope(dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, b"p", SIGNER))
    if name == "stripped signature":
        del good.signatures[:]
        return good, SignatureError
    if name == "altered payload":
        good.payload = b"q"
        return good, SignatureError
    if name == "payload type relabelled":
        good.payload_type = dsse.GAP_NOTICE_PAYLOAD_TYPE
        return good, SignatureError
    if name == "unknown key":
        return dsse.parse_envelope(
            dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, b"p", OTHER)
        ), UnknownKeyError
    if name == "signature by other key under our key id":
        good.signatures[0].sig = OTHER.sign(dsse.pae(good.payload_type, good.payload))
        return good, SignatureError
    if name == "validly signed unexpected type":
        return dsse.parse_envelope(
            dsse.sign_envelope("application/json", b"{}", SIGNER)
        ), PayloadTypeError
    raise AssertionError(name)


FORGERIES = [
    "stripped signature",
    "altered payload",
    "payload type relabelled",
    "unknown key",
    "signature by other key under our key id",
    "validly signed unexpected type",
]


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_envelope_is_refused(name: str) -> None:
    envelope, error = _forge(name)
    with pytest.raises(error):
        dsse.verify(envelope, trusted(SIGNER).get, TYPES)


def test_a_good_signature_among_bad_ones_verifies() -> None:
    envelope = dsse.parse_envelope(dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, b"p", SIGNER))
    envelope.signatures.insert(0, Signature(keyid=SIGNER.key_id, sig=b"\x00" * 64))
    assert dsse.verify(envelope, trusted(SIGNER).get, TYPES).payload == b"p"


def test_oversized_envelope_is_refused_before_parsing() -> None:
    limits = WireLimits(max_envelope_bytes=100)
    with pytest.raises(LimitError):
        dsse.parse_envelope(b"\x00" * 101, limits)


def test_garbage_is_malformed() -> None:
    with pytest.raises(MalformedError):
        dsse.parse_envelope(b"\xff\xff\xff\xff")


@given(payload=st.binary(max_size=512), flip=st.integers(min_value=0))
def test_any_single_bit_flip_in_payload_fails(payload: bytes, flip: int) -> None:
    envelope = dsse.parse_envelope(dsse.sign_envelope(dsse.EVIDENCE_PAYLOAD_TYPE, payload, SIGNER))
    if not payload:
        envelope.payload = b"\x01"
    else:
        position = flip % (len(payload) * 8)
        mutated = bytearray(payload)
        mutated[position // 8] ^= 1 << (position % 8)
        envelope.payload = bytes(mutated)
    with pytest.raises(SignatureError):
        dsse.verify(envelope, trusted(SIGNER).get, TYPES)
