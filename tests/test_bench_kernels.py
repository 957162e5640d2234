"""`cotune bench kernels`: its smoke mode runs every code path on the CPU (Triton in its
interpreter) and writes a complete result; without a GPU and without --smoke it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cotune.bench import kernels
from cotune.bench.roofline import OPS
from cotune.cli import main

SYSTEMS = ("base", "lora-triton", "lora-torch")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, list]:
    """(result JSON, files written) of one smoke run, in a fresh process: TRITON_INTERPRET
    must be set before triton is imported, and one thread spares the shared CI cores."""
    out = tmp_path_factory.mktemp("kernels-smoke")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "cotune.cli", "bench", "kernels", "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "kernels-cpu.json").read_text()), sorted(out.iterdir())


def test_smoke_times_every_op_on_every_case_with_both_implementations(smoke):
    result, _ = smoke
    expected = {(op, c.model, c.layer, c.rank, c.phase, c.sequences, c.tokens, c.adapters)
                for c in kernels.cases(kernels.SMOKE) for op in OPS}
    rows = {(r["op"], r["model"], r["layer"], r["rank"], r["phase"], r["sequences"],
             r["tokens"], r["adapters"]): r for r in result["kernels"]}
    assert set(rows) == expected and len(result["kernels"]) == len(expected)
    for row in rows.values():
        assert row["triton_us"] > 0 and row["torch_us"] > 0 and row["roofline_us"] > 0


def test_smoke_roofline_fractions_are_between_zero_and_one(smoke):
    result, _ = smoke
    for row in result["kernels"]:
        for name in ("triton", "torch"):
            fraction = row[f"{name}_roofline_fraction"]
            assert 0 < fraction <= 1, (name, row)
            assert fraction == pytest.approx(row["roofline_us"] / row[f"{name}_us"])


def test_smoke_decode_compares_the_base_with_both_implementations(smoke):
    result, _ = smoke
    decode = result["decode"]
    assert set(decode["tokens_per_s"]) == set(SYSTEMS)
    assert all(decode["tokens_per_s"][name] > 0 for name in SYSTEMS)
    assert set(decode["ratios"]) == {"lora-triton", "lora-torch"}
    assert decode["lora_roofline_ms"] > 0 and 0 < decode["ratio_bound"] <= 1


def test_smoke_result_names_the_machine_and_writes_a_table(smoke):
    result, files = smoke
    assert result["smoke"] is True and result["dtype"] == "float32"
    assert result["device"] == "cpu" and result["torch"] and result["triton"]
    assert result["peaks"]["bytes_per_s"] > 0 and result["peaks"]["flops_per_s"] > 0
    assert [f.name for f in files] == ["kernels-cpu.json", "kernels-cpu.md"]
    assert "SMOKE RUN" in files[1].read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU would run the real benchmark")
def test_without_smoke_on_a_cpu_machine_refuses_plainly(tmp_path, capsys):
    assert main(["bench", "kernels", "--out", str(tmp_path)]) != 0
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_smoke_refuses_without_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.CannotRun, match="TRITON_INTERPRET=1"):
        kernels.check_can_run(smoke=True, out_dir=None)


def test_smoke_refuses_to_write_into_benchmarks_results(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(kernels.CannotRun, match="never go to"):
        kernels.check_can_run(smoke=True, out_dir=kernels.RESULTS_DIR)
