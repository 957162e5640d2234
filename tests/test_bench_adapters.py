"""`cotune bench adapters --smoke`: the whole benchmark with small numbers, through the CLI;
its counts follow from the load it ran."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cotune.bench.adapters import SMOKE
from cotune.cli import main


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-adapters")
    assert main(["bench", "adapters", "--smoke", "--out", str(out)]) == 0
    return json.loads((out / "adapters-smoke.json").read_text()), out


def test_every_request_generated_all_its_tokens_in_every_run(smoke):
    result, _ = smoke
    for name in ("few", "many"):
        assert len(result["runs"][name]) == SMOKE.rounds
        for run in result["runs"][name]:
            assert run["tokens"] == SMOKE.requests * SMOKE.new_tokens
            assert run["steps"] >= SMOKE.new_tokens


def test_each_distinct_adapter_is_read_from_disk_once_and_placed_in_a_slot(smoke):
    result, _ = smoke
    few, many = result["best"]["few"], result["best"]["many"]
    assert (few["adapters"], many["adapters"]) == (SMOKE.few, SMOKE.many)
    # A fresh runtime per run, and a host cache that holds them all: one disk read each.
    assert few["disk_to_host"]["count"] == SMOKE.few
    assert many["disk_to_host"]["count"] == SMOKE.many
    # The few fit the slots and stay; the many pass through 8 slots, some more than once.
    assert few["host_to_device"]["count"] == SMOKE.few
    assert many["host_to_device"]["count"] >= SMOKE.many
    for run in (few, many):
        for tier in ("disk_to_host", "host_to_device"):
            assert 0 < run[tier]["p50_ms"] <= run[tier]["p99_ms"]


def test_the_ratio_and_the_report_name_the_runs_and_the_machine(smoke):
    result, out = smoke
    best, runs = result["best"], result["runs"]
    assert result["round_ratios"] == pytest.approx(
        [m["tokens_per_s"] / f["tokens_per_s"] for f, m in zip(runs["few"], runs["many"])])
    assert result["throughput_ratio"] == pytest.approx(float(np.median(result["round_ratios"])))
    assert result["best_ratio"] == pytest.approx(
        best["many"]["tokens_per_s"] / best["few"]["tokens_per_s"])
    for run in best.values():
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
    report = (out / "adapters-smoke.md").read_text()
    assert result["machine"] in report and "device: cpu" in report
    assert f"{result['throughput_ratio']:.3f}x" in report
