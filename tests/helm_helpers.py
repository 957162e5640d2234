"""Shared by the Helm chart tests (test_helm_chart.py, test_helm_deployment.py): the real
helm binary, the chart's renders (each computed once per test session) and what picks the
objects and containers out of them."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
HELM = ROOT / ".tools/helm/helm"
CHART = ROOT / "deploy/helm/cotune"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
KUBERNETES = "1.31"
# the oldest Kubernetes the chart admits (Chart.yaml kubeVersion) is checked too
OLDEST = re.search(r'kubeVersion: ">=(\d+\.\d+)', (CHART / "Chart.yaml").read_text()).group(1)
CASES = ["default", *sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))]
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


def helm(*args: str) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run `make .tools/.installed` (CI installs it)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)


def values_args(case: str) -> list[str]:
    return [] if case == "default" else ["-f", str(CHART / "ci" / f"{case}.yaml")]


def template(*args: str) -> list[dict]:
    result = helm("template", "rel", str(CHART), "--namespace", "ml", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def rendered(case: str) -> tuple[dict, ...]:
    return tuple(template(*values_args(case)))


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def worker_container(statefulset: dict) -> dict:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def chart_values(case: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if case != "default":
        merge(values, yaml.safe_load((CHART / "ci" / f"{case}.yaml").read_text()))
    return values


def merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def containers(docs) -> list[dict]:
    """The worker containers, then the router's."""
    found = [worker_container(s) for s in of_kind(docs, "StatefulSet")]
    return found + [d["spec"]["template"]["spec"]["containers"][0]
                    for d in of_kind(docs, "Deployment")]
