"""The committed generated code must be what protoc makes from the committed .proto files."""

from __future__ import annotations

from pathlib import Path

from proto.generate import PROTO_DIR, generated_files


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = generated_files(tmp_path)
    assert fresh, "protoc produced nothing"
    stale = [name for name, content in fresh.items() if (PROTO_DIR / name).read_bytes() != content]
    assert not stale, f"regenerate with `python -m proto.generate`: {stale}"


def test_no_generated_file_without_a_source(tmp_path: Path) -> None:
    fresh = set(generated_files(tmp_path))
    committed = {p.name for p in PROTO_DIR.iterdir() if "_pb2" in p.name}
    assert committed == fresh
