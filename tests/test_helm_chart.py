"""The Helm chart (deploy/helm/cotune), offline: lint, schemas and the workers.

The real helm binary lints and renders the chart with its default values and with each
example file of ci/; every Kubernetes object of the output is checked against the API schema
of Kubernetes 1.31 (kubernetes-validate, strict: unknown fields fail), the Prometheus
operator's objects by their required fields. No cluster and no docker are needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import re

import kubernetes_validate
import pytest
import yaml
from helm_helpers import (
    CASES,
    CHART,
    CUSTOM_KINDS,
    KUBERNETES,
    OLDEST,
    chart_values,
    containers,
    env_of,
    helm,
    of_kind,
    one,
    rendered,
    template,
    values_args,
    worker_container,
)

from cotune.server.options import add_serve_arguments

# --- lint and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_strict_passes(case):
    result = helm("lint", "--strict", str(CHART), *values_args(case))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", sorted({OLDEST, KUBERNETES}))
@pytest.mark.parametrize("case", CASES)
def test_every_kubernetes_object_validates_against_the_api_schema(case, version):
    docs = rendered(case)
    assert docs
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, desired_version=version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{case}, Kubernetes {version}: {doc['kind']} "
                        f"{doc['metadata']['name']} at {'.'.join(map(str, error.path))}: "
                        f"{error.message}")


def test_strict_validation_rejects_an_unknown_field():
    # the check above can fail: a field Kubernetes does not know is an error
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"ports": [{"port": 1}], "clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, desired_version=KUBERNETES, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_custom_resources_have_their_required_fields(case):
    docs = rendered(case)
    values = chart_values(case)["metrics"]
    monitors, rules = of_kind(docs, "ServiceMonitor"), of_kind(docs, "PrometheusRule")
    assert len(monitors) == int(values["serviceMonitor"]["enabled"])
    assert len(rules) == int(values["prometheusRule"]["enabled"])
    for doc in monitors + rules:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["name"]
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for rule in rules:
        assert rule["spec"]["groups"]
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for r in group["rules"]:
                assert ("alert" in r) != ("record" in r), r
                assert isinstance(r["expr"], str) and r["expr"].strip(), r


def test_prometheus_rule_carries_the_groups_of_files_alerts_yaml():
    alerts = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
    rule = one(rendered("default"), "PrometheusRule")
    assert rule["spec"]["groups"] == alerts["groups"]


def test_servicemonitor_scrapes_the_metrics_port_of_workers_and_router_once_each():
    docs = rendered("gpu-sharded")
    monitor = one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    scraped = [s for s in of_kind(docs, "Service")
               if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
               and s["metadata"]["labels"].get(expression["key"]) in expression["values"]]
    assert sorted(s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in scraped) == [
        "cotune-router", "cotune-worker"]
    for service in scraped:
        assert service["spec"].get("clusterIP") != "None"  # the headless one would scrape twice
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert ports["metrics"] == 9400


@pytest.mark.parametrize("case", CASES)
def test_dashboard_configmap_holds_grafana_json_with_panels(case):
    (dashboard,) = [c for c in of_kind(rendered(case), "ConfigMap")
                    if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    (text,) = dashboard["data"].values()
    assert json.loads(text)["panels"]
    assert json.loads(text) == json.loads((CHART / "files/cotune-dashboard.json").read_text())


def test_gpu_sharded_puts_the_dashboard_where_grafana_looks():
    (dashboard,) = [c for c in of_kind(rendered("gpu-sharded"), "ConfigMap")
                    if c["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["namespace"] == "monitoring"


def test_monitoring_objects_can_each_be_turned_off():
    docs = template("--set", "metrics.serviceMonitor.enabled=false",
                    "--set", "metrics.prometheusRule.enabled=false",
                    "--set", "metrics.dashboard.enabled=false")
    assert not of_kind(docs, "ServiceMonitor") and not of_kind(docs, "PrometheusRule")
    names = [c["metadata"]["name"] for c in of_kind(docs, "ConfigMap")]
    assert not [name for name in names if name.endswith("-dashboard")]


@pytest.mark.parametrize("bad, message", [
    (["--set-string", "workers.replicas=two"], "workers.replicas"),
    (["--set", "workers.replica=2"], "replica"),
    (["--set", "server.dtype=float16"], "server.dtype"),
    (["--set", "server.quantize=int3"], "server.quantize"),
    (["--set", "model.volume.type=nfs"], "model.volume.type"),
    (["--set", "ports.grpc=70000"], "ports.grpc"),
    (["--set", "ports.http=0"], "ports.http"),
    (["--set", "ports.http=65536"], "ports.http"),
    (["--set-string", "http.enabled=yes"], "http.enabled"),
    (["--set", "server.keepTrainingStates=0"], "server.keepTrainingStates"),
    (["--set", "server.uploadIdleTimeoutSeconds=0"], "server.uploadIdleTimeoutSeconds"),
    (["--set", "server.sessionIdleTimeoutSeconds=0"], "server.sessionIdleTimeoutSeconds"),
    (["--set", "server.defaultQuotas.maxSessions=-1"], "server.defaultQuotas.maxSessions"),
    (["--set", "server.healthStallSeconds=-1"], "server.healthStallSeconds"),
    (["--set", "server.maxLogprobs=-1"], "server.maxLogprobs"),
    (["--set", "server.maxOpenStreamsPerTenant=-1"], "server.maxOpenStreamsPerTenant"),
    (["--set-json", "server.tenantIsolation=0.5"], "server.tenantIsolation"),
    (["--set", "server.maxFilesPerTenant=-1"], "server.maxFilesPerTenant"),
    (["--set", "blobs.url=s3://Adapters_Bucket/prod"], "blobs.url"),  # not a bucket's name
    (["--set", "blobs.url=https://adapters.s3.amazonaws.com"], "blobs.url"),
    (["--set", "blobs.cacheMb=0"], "blobs.cacheMb"),
    (["--set", "blobs.endpoint=minio.storage.svc:9000"], "blobs.endpoint"),  # no scheme
])
def test_values_schema_rejects_a_bad_value_with_its_name(bad, message):
    result = helm("template", "rel", str(CHART), *bad)
    assert result.returncode != 0
    assert message in result.stderr and "schema" in result.stderr, result.stderr


@pytest.mark.parametrize("bad, message", [
    (["--set", "workers.shardedBase=true,workers.ranksPerGroup=4,workers.replicas=6"],
     "must be a multiple of workers.ranksPerGroup"),
    (["--set", "workers.ranksPerGroup=2"], "needs workers.shardedBase"),
    (["--set", "workers.shardedBase=true,workers.ranksPerGroup=2,workers.replicas=2",
      "--set", "autoscaling.enabled=true"], "fixed size"),
    (["--set", "tls.enabled=true"], "tls.secretName"),
    (["--set", "model.volume.type=persistentVolumeClaim"], "model.volume.claimName"),
    (["--set", "router.enabled=true,tls.enabled=true,tls.secretName=tls"],
     "router.enabled does not go with tls.enabled"),
    (["--set", "ports.http=9400"], "ports.http (9400) is also one of ports.grpc"),
    (["--set", "server.maxOpenStreams=8,server.maxOpenStreamsPerTenant=9"],
     "server.maxOpenStreamsPerTenant (9) exceeds server.maxOpenStreams (8)"),
    (["--set", "registry.existingSecret=pg"], "registry.existingSecret needs blobs.url"),
    (["--set", "blobs.url=s3://adapters"], "blobs.url needs registry.existingSecret"),
    (["--set", "blobs.existingSecret=s3-keys"], "settings of the external mode"),
    (["-f", str(CHART / "ci/postgres-s3.yaml"), "--set", "workers.persistence.sharedClaim=c"],
     "workers.persistence.sharedClaim does not go with the external mode"),
    (["-f", str(CHART / "ci/postgres-s3.yaml"),
      "--set", "workers.shardedBase=true,workers.ranksPerGroup=3,workers.replicas=3"],
     "registry.existingSecret does not go with workers.shardedBase"),
    (["--set", "server.quantize=int4,workers.shardedBase=true,workers.ranksPerGroup=2,"
               "workers.replicas=2"], "server.quantize does not go with workers.shardedBase"),
])
def test_template_refuses_inconsistent_values_and_says_what_to_change(bad, message):
    result = helm("template", "rel", str(CHART), *bad)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_every_value_has_a_comment():
    """A leaf value needs a comment line above it, unless it sits inside a block whose own
    comment ("# -- ...") describes it as a whole (resources, security contexts)."""
    undocumented, ancestors = [], []  # ancestors: (indent, documented as a whole)
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        match = re.match(r"^( *)(- )?([\w.-]+):(.*)$", line)
        if match and not match.group(2):
            indent, rest = len(match.group(1)), match.group(4).split(" #")[0].strip()
            ancestors = [a for a in ancestors if a[0] < indent]
            commented = previous.startswith("#")
            covered = any(documented for _, documented in ancestors)
            if rest == "":  # a block: a section or a free-form value
                ancestors.append((indent, previous.startswith("# --")))
            elif not (commented or covered):
                undocumented.append(f"values.yaml:{number}: {stripped}")
        if stripped:
            previous = stripped
    assert not undocumented, "\n".join(undocumented)


# --- workers ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_termination_grace_outlasts_prestop_drain_and_checkpoints(case):
    docs = rendered(case)
    config = one(docs, "ConfigMap", "rel-cotune-config")["data"]
    grace = float(config["COTUNE_SERVE_GRACE_PERIOD"])
    for statefulset in of_kind(docs, "StatefulSet"):
        pod = statefulset["spec"]["template"]["spec"]
        container = worker_container(statefulset)
        assert "--grace-period=$(COTUNE_SERVE_GRACE_PERIOD)" in container["args"]
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * grace


def probes_of(container: dict) -> list[dict]:
    return [container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")
            if k in container]


@pytest.mark.parametrize("case", [c for c in CASES if c != "tls"])
def test_with_http_the_probes_get_health_on_the_http_port(case):
    docs = rendered(case)
    assert containers(docs)
    for container in containers(docs):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert (ports["grpc"], ports["http"]) == (50051, 8000)
        assert len(probes_of(container)) >= 2
        for probe in probes_of(container):
            assert probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}


def test_without_http_the_probes_are_grpc_health_checks_on_the_grpc_port():
    docs = template("--set", "http.enabled=false,router.enabled=true")
    assert len(containers(docs)) == 2
    for container in containers(docs):
        assert "http" not in {p["name"] for p in container["ports"]}
        assert len(probes_of(container)) >= 2
        for probe in probes_of(container):
            assert probe["grpc"] == {"port": 50051} and "httpGet" not in probe


def test_with_tls_the_http_probes_speak_https_unless_client_certificates_are_required():
    docs = template("--set", "tls.enabled=true,tls.secretName=server-tls")
    for probe in probes_of(worker_container(one(docs, "StatefulSet"))):
        assert probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}
    service = one(docs, "Service", "rel-cotune-workers")
    assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]}["http"] == "https"


def test_with_mutual_tls_the_probes_check_the_tcp_port_and_the_certificates_are_mounted():
    statefulset = one(rendered("tls"), "StatefulSet")
    container = worker_container(statefulset)
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        # the kubelet presents no client certificate: /health over HTTPS would be refused
        assert container[key]["tcpSocket"] == {"port": "grpc"}
        assert not {"grpc", "httpGet"} & container[key].keys()
    assert {"--tls-cert=/etc/cotune/tls/tls.crt", "--tls-key=/etc/cotune/tls/tls.key",
            "--tls-client-ca=/etc/cotune/client-ca/ca.crt"} <= set(container["args"])
    secrets = {v["name"]: v["secret"]["secretName"]
               for v in statefulset["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert secrets["tls"] == "cotune-server-tls" and secrets["client-ca"] == "cotune-client-ca"


@pytest.mark.parametrize("case", CASES)
def test_worker_arguments_parse_as_cotune_serve_flags(case):
    """The chart's arguments, with $(VAR) filled from the ConfigMap as the kubelet does, are
    accepted by the real `cotune serve` parser: a renamed or misspelt flag fails here."""
    docs = rendered(case)
    config = one(docs, "ConfigMap", "rel-cotune-config")["data"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    for statefulset in of_kind(docs, "StatefulSet"):
        command, *args = worker_container(statefulset)["args"]
        assert command == "serve"
        unknown = sorted(set(re.findall(r"\$\((\w+)\)", " ".join(args))) - config.keys())
        assert not unknown, f"arguments name variables the ConfigMap lacks: {unknown}"
        filled = [re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a) for a in args]
        parsed, extra = parser.parse_known_args(filled)
        assert not extra, f"cotune serve does not know {extra}"
        assert (parsed.host, parsed.port, str(parsed.data_dir), parsed.http_port) == (
            "0.0.0.0", 50051, "/var/lib/cotune", 8000)


def serve_arguments(*args: str) -> argparse.Namespace:
    """The worker's arguments rendered with `args`, filled from the ConfigMap as the kubelet
    does, parsed by the real `cotune serve` parser."""
    return parsed_worker_arguments(template(*args))


def parsed_worker_arguments(docs) -> argparse.Namespace:
    """The worker's arguments of `docs`, filled from the ConfigMap as the kubelet does, parsed
    by the real `cotune serve` parser."""
    config = one(docs, "ConfigMap", "rel-cotune-config")["data"]
    _, *rendered_args = worker_container(one(docs, "StatefulSet"))["args"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    return parser.parse_args([re.sub(r"\$\((\w+)\)", lambda m: config[m.group(1)], a)
                              for a in rendered_args])


def test_server_values_reach_the_flags_of_cotune_serve():
    parsed = serve_arguments(
        "--set", "server.maxOpenStreams=12,server.maxOpenStreamsPerTenant=5",
        "--set-json", "server.uploadIdleTimeoutSeconds=7.5",  # --set makes 7.5 a string
        "--set", "server.maxLogprobs=3",
        "--set", "server.healthStallSeconds=90,server.keepTrainingStates=4",
        "--set-json", "server.jobLeaseSeconds=12.5",
        "--set-json", "server.sessionIdleTimeoutSeconds=45.5",
        "--set", "server.defaultQuotas.maxSessions=3",
        "--set", "ports.http=8080",
        "--set-json", "server.tenantIsolation=2.5", "--set", "server.maxFilesPerTenant=7",
        # floats to Helm, as numbers of a values file are: no 1.048576e+06 may reach int()
        "--set-json", "server.kvCacheTokens=1048576",
        "--set-json", "server.defaultQuotas.tokensPerMinute=2000000",
        "--set", "server.quantize=int4,server.dtype=bfloat16")
    assert (parsed.quantize, parsed.dtype) == ("int4", "bfloat16")
    assert (parsed.tenant_isolation, parsed.max_files_per_tenant) == (2.5, 7)
    assert (parsed.kv_cache_tokens, parsed.default_tokens_per_minute) == (1048576, 2000000)
    assert (parsed.max_open_streams, parsed.max_open_streams_per_tenant) == (12, 5)
    assert (parsed.upload_idle_timeout, parsed.max_logprobs) == (7.5, 3)
    assert (parsed.health_stall_seconds, parsed.keep_training_states) == (90, 4)
    assert parsed.job_lease_seconds == 12.5
    assert (parsed.session_idle_timeout, parsed.default_max_sessions) == (45.5, 3)
    assert parsed.http_port == 8080


def test_default_values_leave_the_servers_own_defaults():
    """The chart's defaults are `cotune serve`'s: installing the chart changes no behaviour
    that running the command would have (0 per tenant: the server's own quarter)."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    own = parser.parse_args([])
    parsed = serve_arguments()
    for flag in ("max_open_streams", "max_open_streams_per_tenant", "upload_idle_timeout",
                 "max_logprobs", "health_stall_seconds", "keep_training_states",
                 "max_queued_requests", "max_upload_mb", "max_rank", "num_slots",
                 "tenant_isolation", "max_files_per_tenant", "session_idle_timeout",
                 "default_max_sessions", "quantize"):
        assert getattr(parsed, flag) == getattr(own, flag), flag


# `cotune serve` flags that no value sets (server.extraArgs passes them), and why
LEFT_TO_EXTRA_ARGS = {
    "--threads", "--training-threads", "--time-slice",  # tuning against the pod's CPU limit
    "--nvme-path", "--rank-timeout",  # sharded-base tuning (NVMe offload needs a volume)
    "--metrics-top-adapters",  # the label budget of Prometheus, rarely changed
    "--worker-id",  # the hostname by default: the pod's name, stable in a StatefulSet
}


def serve_flags_read_from(variables: set[str]) -> set[str]:
    """The flags of `cotune serve` whose defaults come from these environment variables: those
    whose defaults change when the variables are set."""
    def defaults() -> dict[str, object]:
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        return {a.option_strings[-1]: a.default for a in parser._actions if a.option_strings}

    with pytest.MonkeyPatch.context() as patch:
        for name in variables:
            patch.delenv(name, raising=False)
        unset = defaults()
        for name in variables:
            patch.setenv(name, "1")  # parses as any type a default could be read as
        return {flag for flag, value in defaults().items() if value != unset[flag]}


def test_every_flag_of_cotune_serve_is_set_by_a_value_or_left_to_extra_args():
    """A flag added to `cotune serve` fails here until the chart passes it, as an argument or
    as the environment variable it defaults to (--registry: $COTUNE_REGISTRY, from a Secret),
    or it is listed above with its reason."""
    sharded = template("--set", "tls.enabled=true,tls.secretName=t,tls.clientCASecretName=c",
                       "--set", "server.allowPaths={/srv},server.maxOpenStreamsPerTenant=2",
                       "--set", "workers.shardedBase=true,workers.ranksPerGroup=2,"
                       "workers.replicas=2")
    # the external mode (registry, blobs) and a quantized base do not go with a sharded
    # base: renders of their own
    quantized = template("--set", "server.quantize=int8")
    workers = [worker_container(s) for docs in (sharded, rendered("postgres-s3"), quantized)
               for s in of_kind(docs, "StatefulSet")]
    passed = {a.split("=", 1)[0] for c in workers for a in c["args"][1:]}
    from_environment = serve_flags_read_from({e["name"] for c in workers for e in c["env"]})
    assert "--registry" in from_environment and "--registry" not in passed
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {a.option_strings[-1] for a in parser._actions if a.dest != "help"}
    assert passed <= flags
    assert flags - passed - from_environment == LEFT_TO_EXTRA_ARGS


@pytest.mark.parametrize("case", CASES)
def test_statefulsets_rendezvous_through_the_headless_service(case):
    docs = rendered(case)
    headless = one(docs, "Service", "rel-cotune-workers-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    statefulsets = of_kind(docs, "StatefulSet")
    assert statefulsets
    for statefulset in statefulsets:
        assert statefulset["spec"]["serviceName"] == "rel-cotune-workers-headless"
        pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert headless["spec"]["selector"].items() <= pod_labels.items()
        assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_sharded_groups_get_torchrun_variables_from_the_statefulset_ordinal():
    statefulsets = of_kind(rendered("gpu-sharded"), "StatefulSet")
    assert [s["metadata"]["name"] for s in statefulsets] == [
        "rel-cotune-workers-g0", "rel-cotune-workers-g1"]
    for group, statefulset in enumerate(statefulsets):
        assert statefulset["spec"]["replicas"] == 4
        assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
        env = env_of(worker_container(statefulset))
        assert env["MASTER_ADDR"]["value"] == (
            f"rel-cotune-workers-g{group}-0.rel-cotune-workers-headless.ml.svc")
        assert env["MASTER_PORT"]["value"] == "29500"
        assert env["WORLD_SIZE"]["value"] == "4"
        assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['apps.kubernetes.io/pod-index']")
        assert "--zero-offload=none" in worker_container(statefulset)["args"]
    # the groups' selectors do not overlap: each StatefulSet owns its own pods
    selectors = [s["spec"]["selector"]["matchLabels"] for s in statefulsets]
    assert selectors[0] != selectors[1]


def test_unsharded_workers_get_no_rendezvous_variables():
    env = env_of(worker_container(one(rendered("default"), "StatefulSet")))
    assert not {"MASTER_ADDR", "RANK", "WORLD_SIZE"} & env.keys()


def test_gpu_files_request_nvidia_gpus_and_the_cpu_file_does_not():
    for case in ("gpu-sharded", "autoscaling"):
        for statefulset in of_kind(rendered(case), "StatefulSet"):
            resources = worker_container(statefulset)["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == 1
    for case in ("default", "cpu-single-worker"):
        resources = worker_container(one(rendered(case), "StatefulSet"))["resources"]
        assert not any("nvidia.com/gpu" in r for r in resources.values())
    pod = of_kind(rendered("gpu-sharded"), "StatefulSet")[0]["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


@pytest.mark.parametrize("case", CASES)
def test_pods_run_as_non_root_on_a_read_only_root_with_writable_volumes(case):
    docs = rendered(case)
    deployments = of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment")
    for workload in deployments:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            writable = {m["mountPath"] for m in container["volumeMounts"]
                        if not m.get("readOnly")}
            assert "/tmp" in writable
    for statefulset in of_kind(docs, "StatefulSet"):
        mounts = {m["mountPath"]: m for m in worker_container(statefulset)["volumeMounts"]}
        assert not mounts["/var/lib/cotune"].get("readOnly")
        assert mounts["/models"]["readOnly"] is True
        claims = [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]]
        assert claims == ["data"]  # one PersistentVolumeClaim per worker


def test_admin_token_secret_is_generated_or_named_and_mounted():
    docs = rendered("default")
    secret = one(docs, "Secret", "rel-cotune-admin")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"ct_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token), token  # as cotune's
    volumes = one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "admin-token", "secret": {"secretName": "rel-cotune-admin", "items": [
        {"key": "token", "path": "token"}]}} in volumes
    docs = rendered("tls")  # adminToken.existingSecret: the chart makes none
    assert not of_kind(docs, "Secret")
    volumes = one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "admin-token", "secret": {"secretName": "cotune-admin-token", "items": [
        {"key": "token", "path": "token"}]}} in volumes


def test_workers_without_persistence_keep_their_data_in_an_empty_dir():
    (statefulset,) = of_kind(template("--set", "workers.persistence.enabled=false"),
                             "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_workers_with_a_shared_claim_mount_that_one_claim_as_their_data():
    (statefulset,) = of_kind(template("--set", "workers.persistence.sharedClaim=cotune-shared",
                                      "--set", "workers.replicas=3"), "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "cotune-shared"}
    assert not [a for a in worker_container(statefulset)["args"] if "--worker-id" in a]  # the pod


# the environment of the external mode: the registry's and the store's settings
EXTERNAL_ENV = {"COTUNE_REGISTRY", "PGPASSWORD", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def secret_ref(name: str, key: str) -> dict:
    return {"valueFrom": {"secretKeyRef": {"name": name, "key": key}}}


def test_embedded_mode_renders_no_registry_or_store_settings():
    docs = rendered("default")
    container = worker_container(one(docs, "StatefulSet"))
    assert not EXTERNAL_ENV & env_of(container).keys()
    assert not [a for a in container["args"] if a.startswith(("--registry", "--blob"))]
    assert not [k for k in one(docs, "ConfigMap", "rel-cotune-config")["data"] if "BLOB" in k]


def test_external_mode_takes_the_registry_and_the_store_keys_from_secrets_not_arguments():
    docs = rendered("postgres-s3")
    statefulset = one(docs, "StatefulSet")
    container = worker_container(statefulset)
    env = env_of(container)
    assert {name: {k: v for k, v in env[name].items() if k != "name"}
            for name in EXTERNAL_ENV} == {
        "COTUNE_REGISTRY": secret_ref("cotune-registry", "url"),
        "PGPASSWORD": secret_ref("cotune-registry", "password"),
        "AWS_ENDPOINT_URL": {"value": "http://minio.storage.svc:9000"},
        "AWS_DEFAULT_REGION": {"value": "us-east-1"},
        "AWS_ACCESS_KEY_ID": secret_ref("cotune-blobs", "access-key-id"),
        "AWS_SECRET_ACCESS_KEY": secret_ref("cotune-blobs", "secret-access-key")}
    # the store's URL is no secret: an argument, from the ConfigMap; the registry's never is
    config = one(docs, "ConfigMap", "rel-cotune-config")["data"]
    assert [a for a in container["args"] if a.startswith(("--registry", "--blob"))] == [
        "--blobs=$(COTUNE_SERVE_BLOBS)", "--blob-cache-mb=$(COTUNE_SERVE_BLOB_CACHE_MB)"]
    assert (config["COTUNE_SERVE_BLOBS"], config["COTUNE_SERVE_BLOB_CACHE_MB"]) == (
        "s3://cotune-adapters/prod", "20480")
    assert not [v for v in [*container["args"], *config.values()] if "postgres" in v]
    parsed = parsed_worker_arguments(docs)
    assert (parsed.blobs, parsed.blob_cache_mb) == ("s3://cotune-adapters/prod", 20480)
    # the chart names the registry's and the store's Secrets, it makes none
    assert [s["metadata"]["name"] for s in of_kind(docs, "Secret")] == ["rel-cotune-admin"]
    # each worker keeps a ReadWriteOnce claim of its own: nothing ties the pods to one node
    assert [t["spec"]["accessModes"] for t in statefulset["spec"]["volumeClaimTemplates"]] == [
        ["ReadWriteOnce"]]
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert "data" not in {v["name"] for v in volumes}
    assert "ReadWriteMany" not in json.dumps(docs)


def test_external_mode_without_password_key_or_store_secret_leaves_them_to_their_defaults():
    """No PGPASSWORD (the passfile or the URL has it), no AWS keys (boto3 finds a cloud role),
    and --blob-cache-mb the server's own default."""
    docs = template("--set", "registry.existingSecret=pg,blobs.url=s3://adapters")
    env = env_of(worker_container(one(docs, "StatefulSet")))
    assert EXTERNAL_ENV & env.keys() == {"COTUNE_REGISTRY"}
    assert env["COTUNE_REGISTRY"]["valueFrom"] == secret_ref("pg", "url")["valueFrom"]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    parsed = parsed_worker_arguments(docs)
    assert (parsed.blobs, parsed.blob_cache_mb) == (
        "s3://adapters", parser.get_default("blob_cache_mb"))
