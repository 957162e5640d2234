"""The alert rules of the chart (deploy/helm/cotune/files/alerts.yaml): promtool accepts them,
its unit tests (tests/alerts_test.yaml) make every alert fire and keep near misses quiet, and
every rule reads series that cotune really exposes."""

from __future__ import annotations

import subprocess

import yaml
from monitoring import ALERT_TESTS, ALERTS, alert_rules, check_selectors, tool

SEVERITIES = {"critical", "warning", "info"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_a_unit_test_and_some_case_must_stay_quiet():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in checks if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts that no unit test makes fire"
    assert fired <= names, "unit tests of alerts that do not exist"
    # The multi-window burn alerts, queue, thrash and tenant alerts have a near miss of their
    # own (the others' near misses are other series in the same test).
    assert {"CotuneSLOBudgetBurnFast", "CotuneSLOBudgetBurnSlow", "CotuneQueueGrowing",
            "CotuneAdapterThrash", "CotuneTenantThrottled", "CotuneServerDown"} <= quiet


def test_every_alert_has_a_severity_a_for_and_says_what_to_do():
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert "for" in rule, f"{name}: a single bad evaluation should not page"
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), name
        assert "$labels" in annotations["summary"] + annotations["description"] or \
            name == "CotuneMetricsAbsent", f"{name}: say which replica, job or tenant"


def test_every_alert_reads_series_that_cotune_exposes():
    problems = [p for rule in alert_rules() for p in check_selectors(rule["expr"], rule["alert"])]
    assert problems == []
