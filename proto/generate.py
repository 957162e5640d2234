"""Generates the Python stubs of the wire contract: proto/cotune/v1/*.proto ->
cotune/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py (`make proto`; tests/test_proto_stubs.py fails
when the checked-in stubs are stale)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("cotune/v1/*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    status = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                          f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                          *sources])
    if status != 0:
        raise SystemExit(f"protoc failed on {', '.join(sources)} (exit {status})")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent)
