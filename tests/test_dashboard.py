"""The Grafana dashboard of the chart (deploy/helm/cotune/files/cotune-dashboard.json), read
without Grafana: its shape, its variables, and that every query reads series cotune exposes.
tests/test_dashboard_live.py runs the queries against a real Prometheus."""

from __future__ import annotations

from monitoring import (
    VARIABLES,
    check_selectors,
    dashboard,
    exposed_series,
    panels,
    selectors,
    substitute,
)

ROWS = ["Serving", "Training", "Adapters", "Tenants", "Capacity"]


def test_the_dashboard_has_its_uid_rows_and_a_templated_prometheus_datasource():
    board = dashboard()
    assert board["uid"] == "cotune" and board["schemaVersion"] >= 39
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("tenant", "adapter", "protocol"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        # "All" must match the base model's requests too, whose adapter label is empty.
        assert variables[name]["allValue"] == ".*", name
    assert variables["tenant"]["query"]["query"].startswith("label_values(cotune_requests_total")
    for panel in panels(board):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_panel_has_queries_and_a_place_of_its_own():
    board = dashboard()
    ids, cells = set(), set()
    for panel in panels(board):
        assert panel["targets"], f"{panel['title']}: no query"
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_query_reads_series_that_cotune_exposes_with_known_labels():
    problems = []
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            problems += check_selectors(target["expr"], panel["title"])
    assert problems == []


def test_queries_use_only_the_variables_the_tests_can_substitute():
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            expr = substitute(target["expr"])  # raises on a variable the tests do not know
            assert "$" not in expr, panel["title"]
    # Rates take Grafana's window, never a fixed one that breaks with the scrape interval;
    # tenant- and adapter-labelled series follow the variables.
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            expr = target["expr"]
            assert "[$__rate_interval]" in expr or "rate(" not in expr, panel["title"]
            for series in ("cotune_requests_total", "cotune_prompt_tokens_total",
                           "cotune_generated_tokens_total", "cotune_training_tokens_total"):
                if series + "{" in expr:
                    body = expr.split(series + "{", 1)[1].split("}", 1)[0]
                    assert 'tenant=~"$tenant"' in body and 'adapter=~"$adapter"' in body, \
                        panel["title"]
    assert set(VARIABLES) >= {"__rate_interval", "tenant", "adapter", "protocol"}


def test_every_per_call_series_follows_the_protocol_variable():
    """A dashboard set to one protocol (grpc or http) shows that protocol's calls only."""
    per_call = {name for name, labels in exposed_series().items() if "protocol" in labels}
    assert {"cotune_requests_total", "cotune_time_to_first_token_seconds_bucket"} <= per_call
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            for name, matchers in selectors(target["expr"]):
                if name in per_call:
                    assert ("protocol", "=~", "$protocol") in matchers, panel["title"]
    protocols = next(v for v in dashboard()["templating"]["list"] if v["name"] == "protocol")
    assert protocols["query"]["query"] == \
        'label_values(cotune_requests_total{job=~"$job"}, protocol)'
