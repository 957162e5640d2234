"""`cotune bench coserve`'s arithmetic: SLOs from serving alone at each rate, failed requests
counted as missed, training against its share of the machine, medians over rounds."""

from __future__ import annotations

import pytest

from cotune.bench.coserve import Outcome, _attainment, _summarise


def test_a_failed_request_counts_as_missed_and_one_token_has_no_tpot_to_miss():
    point = {"requests": [(0.1, 0.01), (None, None), (0.5, 0.01), (0.2, 0.09), (0.2, None)]}
    # met: the first, and the last (one token); failed, late, and too slow a TPOT missed
    assert _attainment(point, ttft_slo=0.3, tpot_slo=0.05) == 2 / 5
    assert _attainment({"requests": []}, 1, 1) is None


def _point(system, load, rnd, ttft, tpot, trained=0.0):
    return dict(system=system, load=load, rate=load * 4, round=rnd,
                requests=[(ttft, tpot)] * 10, trained_per_s=trained, unary_p99_s=0.01,
                tokens=100)


def test_slos_come_from_serving_alone_and_training_from_its_share():
    points = [dict(system="training", rate=0.0, round=r, trained_per_s=t)
              for r, t in enumerate((100.0, 90.0, 110.0))]
    for rnd in range(3):
        points += [_point("serving", 0.5, rnd, ttft=1.0, tpot=0.1),
                   _point("coserve", 0.5, rnd, ttft=1.5, tpot=0.14, trained=35.0),
                   _point("in-steps", 0.5, rnd, ttft=1.2, tpot=0.12, trained=15.0),
                   _point("time-slice", 0.5, rnd, ttft=3.0, tpot=0.1, trained=50.0),
                   _point("split", 0.5, rnd, ttft=1.0, tpot=0.2, trained=20.0)]
    unloaded = [Outcome(0.2, 0.05, 32), Outcome(0.3, None, 1)]
    summary = _summarise(points, capacity=4.0, rates=[2.0], loads=[0.5], unloaded=unloaded,
                         sigterm_exit_s=6.0)
    rows = {row["system"]: row for row in summary["rows"]}
    assert summary["solo_trained_per_s"] == 100.0  # the median of the rounds
    assert rows["coserve"]["ttft_slo_s"] == pytest.approx(2.0)  # 2 x serving alone's p90
    assert rows["coserve"]["tpot_slo_s"] == pytest.approx(0.15)  # 1.5 x
    assert rows["serving"]["slo_attainment"] == rows["coserve"]["slo_attainment"] == 1.0
    assert rows["time-slice"]["slo_attainment"] == rows["split"]["slo_attainment"] == 0.0
    assert rows["coserve"]["training_vs_share"] == pytest.approx(35.0 / 50.0)
    assert rows["in-steps"]["training_vs_share"] == pytest.approx(15.0 / 50.0)
    assert rows["serving"]["training_vs_share"] is None
    assert summary["unloaded_ttft_p90_s"] == 0.3 and summary["unloaded_tpot_p50_s"] == 0.05
