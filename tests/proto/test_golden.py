"""Envelopes built from fixed seeds must match the committed bytes exactly."""

from __future__ import annotations

import pytest

from proto import envelope as dsse
from proto.evidence_pb2 import Evidence
from tests.proto.golden_vectors import GOLDEN_DIR, agent_signer, build_vectors


@pytest.mark.parametrize("name", sorted(build_vectors()))
def test_regenerated_vector_matches_committed_bytes(name: str) -> None:
    assert build_vectors()[name] == (GOLDEN_DIR / name).read_bytes()


def test_committed_vectors_verify_and_chain() -> None:
    signer = agent_signer()
    first = (GOLDEN_DIR / "evidence-1.bin").read_bytes()
    second = (GOLDEN_DIR / "evidence-2.bin").read_bytes()
    keys = {signer.key_id: signer.public_key}
    verified = dsse.verify(
        dsse.parse_envelope(second), keys.get, frozenset({dsse.EVIDENCE_PAYLOAD_TYPE})
    )
    evidence = Evidence.FromString(verified.payload)
    assert evidence.sequence == 2
    assert evidence.previous_envelope_sha256 == dsse.envelope_sha256(first)
