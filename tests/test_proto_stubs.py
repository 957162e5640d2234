"""The checked-in stubs in cotune/v1 are what proto/cotune/v1/*.proto generates today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(out)


def test_checked_in_stubs_match_the_protos(tmp_path):
    _generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*_pb2*.py*")}
    checked_in = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / "cotune/v1").glob("*_pb2*")}
    assert fresh, "protoc generated nothing"
    stale = sorted(str(p) for p in fresh.keys() | checked_in.keys()
                   if fresh.get(p) != checked_in.get(p))
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"
