"""What the monitoring tests share: the alert rules and the Grafana dashboard of the chart, the
series that cotune/server/metrics.py exposes, and the PromQL selectors of an expression."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections import Counter
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import yaml

from cotune.adapters.registry import JOB_STATES

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy/helm/cotune/files/alerts.yaml"
ALERT_TESTS = ROOT / "tests/alerts_test.yaml"
DASHBOARD = ROOT / "deploy/helm/cotune/files/cotune-dashboard.json"
RENDER_PANELS = ROOT / "deploy/grafana/render_panels.py"

# What Grafana puts in place of the dashboard's variables, as the tests evaluate the queries:
# every job, tenant, adapter and protocol, and a rate window of a minute (scrapes are 1 s
# apart).
VARIABLES = {"__rate_interval": "1m", "job": ".*", "tenant": ".*", "adapter": ".*",
             "protocol": ".*"}
# Labels that the scrape adds to every series, and histograms' own.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}

_SELECTOR = re.compile(r"\b(cotune_[a-z_]+|up)\b\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def tool(name: str) -> str:
    """The path of a tool the deployment tests need; fails (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make .tools/.installed` (Debian's "
                    "prometheus package brings prometheus and promtool)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel that draws something (rows are containers), collapsed rows' included."""
    found = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def substitute(expr: str) -> str:
    """`expr` with the dashboard's variables as the tests set them (VARIABLES)."""
    def value(match: re.Match) -> str:
        name = match[1] or match[2]
        if name not in VARIABLES:
            raise KeyError(f"variable ${name} of {expr!r} has no value in tests (VARIABLES)")
        return VARIABLES[name]
    return _VARIABLE.sub(value, expr)


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(metric name, [(label, operator, value), ...]), ...] of the series `expr` selects."""
    return [(m[1], _MATCHER.findall(m[2] or "")) for m in _SELECTOR.finditer(expr)]


def exposed_series() -> dict[str, set[str]]:
    """{series name: its label names} of every series a cotune server can expose, as the
    Prometheus client names them (counters' `_total`, histograms' `_bucket`, `_sum`,
    `_count`), read from a real `Metrics` and its `EngineCollector`."""
    from prometheus_client.metrics import MetricWrapperBase

    from cotune.server.metrics import EngineCollector, Metrics

    series: dict[str, set[str]] = {}
    metrics = Metrics()
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        if metric._type == "counter":
            series[metric._name + "_total"] = labels
        elif metric._type == "histogram":
            series[metric._name + "_bucket"] = labels | {"le"}
            series[metric._name + "_sum"] = series[metric._name + "_count"] = labels
        else:
            series[metric._name] = labels
    runtime = MagicMock()  # a mock engine: names, not values
    runtime.engine.slo_counts = Counter({("tenant", "both", "met"): 1})
    for family in EngineCollector(runtime).collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    series["up"] = set()
    return series


def label_values() -> dict[str, set[str]]:
    """The closed label sets of metrics.py: reason, kind, state, result, protocol."""
    from cotune.server import metrics

    return {"reason": set(metrics.REJECTION_REASONS),
            "kind": set(metrics.STEP_TOKEN_KINDS) | set(metrics.SLO_KINDS),
            "state": set(JOB_STATES), "result": {"met", "missed"},
            "protocol": set(metrics.PROTOCOLS)}


def check_selectors(expr: str, where: str) -> list[str]:
    """Problems of `expr`'s selectors: unknown series, labels, or values of closed sets."""
    known, closed, problems = exposed_series(), label_values(), []
    found = selectors(expr)
    if not found:
        problems.append(f"{where}: selects no series of cotune: {expr}")
    for name, matchers in found:
        if name not in known:
            problems.append(f"{where}: {name} is not a series of cotune/server/metrics.py")
            continue
        for label, op, value in matchers:
            if label not in known[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
            elif op in ("=", "!=") and label in closed and value not in closed[label]:
                problems.append(f"{where}: {name}{{{label}={value!r}}}: not one of "
                                f"{sorted(closed[label])}")
            elif op in ("=~", "!~") and label in closed and "$" not in value:
                unknown = [v for v in value.split("|")
                           if not any(re.fullmatch(v, c) for c in closed[label])]
                if unknown:
                    problems.append(f"{where}: {name}{{{label}=~{value!r}}}: {unknown} match "
                                    f"none of {sorted(closed[label])}")
    return problems
