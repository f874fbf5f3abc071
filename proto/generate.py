"""Regenerate the Python code for the wire contract from the .proto files.

Run ``python -m proto.generate`` after editing a .proto file and commit the result;
``tests/proto/test_generated.py`` fails while the committed code is stale.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("envelope.proto", "evidence.proto", "verifier.proto")
# Only these define services; protoc writes empty *_pb2_grpc modules for the others.
SERVICE_STEMS = ("verifier",)


def generated_files(out_dir: Path) -> dict[str, bytes]:
    """Run protoc into ``out_dir`` and return the generated files by name."""
    staging = out_dir / "proto"
    staging.mkdir(parents=True, exist_ok=True)
    for name in PROTO_FILES:
        shutil.copy(PROTO_DIR / name, staging / name)
    # The mypy plugins are console scripts installed beside this interpreter.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{out_dir}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(f"proto/{name}" for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")
    return {
        path.name: path.read_bytes() for path in sorted(staging.iterdir()) if _is_wanted(path.name)
    }


def _is_wanted(name: str) -> bool:
    if not name.endswith((".py", ".pyi")) or "_pb2" not in name:
        return False
    stem = name.split("_pb2")[0]
    return "_pb2_grpc" not in name or stem in SERVICE_STEMS


def main() -> int:
    """Write the generated modules next to the .proto files."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in generated_files(Path(tmp)).items():
            (PROTO_DIR / name).write_bytes(content)
            print(f"wrote proto/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
