"""The dashboard and the alerts against a real Prometheus scraping a real `cotune serve` under a
short mixed load: every panel's query returns data, every alert's expression returns data once
its condition is forced, the rules evaluate without error, and the server's death fires
CotuneServerDown. Also draws the panels (deploy/grafana/render_panels.py) as an SVG.

The load, in about 25 seconds on the tiny model: two tenants generate on the base model and on
five adapters through three device slots (loads and evictions), bursts past a tenant's
queue quota, past a tenant's tokens-per-minute quota and past the server's queue (every
rejection reason), in a KV cache small enough that bursts preempt, while a fine-tuning job
publishes versions with eval losses.

COTUNE_RENDER_DOCS=1 also writes the SVG to docs/dashboard.svg (the README's picture)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from monitoring import (
    ALERTS,
    RENDER_PANELS,
    ROOT,
    alert_rules,
    dashboard,
    free_port,
    panels,
    substitute,
    tool,
)
from server_helpers import RunningServer, start_server, tiny_adapter_dir
from wire import Caller

from cotune.v1 import training_pb2

pytestmark = pytest.mark.slow

# Seconds of load; COTUNE_DASHBOARD_LOAD_S=90 with COTUNE_RENDER_DOCS=1 for the README picture.
LOAD_S = float(os.environ.get("COTUNE_DASHBOARD_LOAD_S", "25"))
TRAINING_DATA = "\n".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"})
                          for i in range(16)).encode()
# A condition no test can bring about from outside, and what stands in for it.
FORCE = {
    # No job fails on demand: every job that ended stands in for a failed one.
    "CotuneJobsFailing": [('state="failed"', 'state=~".+"')],
}


@dataclass
class Live:
    prometheus: str  # http://127.0.0.1:port
    server: RunningServer
    start: float  # unix seconds: the load's range
    end: float
    errors: list  # status codes of the calls that failed, by tenant

    def query_range(self, expr: str) -> list:
        return query(self.prometheus, "query_range", query=expr, start=self.start,
                     end=self.end, step=1)


def query(prometheus: str, api: str, **params) -> list:
    url = f"{prometheus}/api/v1/{api}?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{params.get('query')}: {e.read().decode()}") from e
    assert body["status"] == "success", body
    return body["data"]["result"] if api.startswith("query") else body["data"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def start_prometheus(root: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    """Prometheus scraping the server every second, with the chart's alerts loaded as they
    are except `for` (0: a rule fires on its first true evaluation)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for group in groups:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule.pop("for", None)
    (root / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (root / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "rules.yaml")],
        "scrape_configs": [{"job_name": "cotune", "static_configs": [
            {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    port = free_port()
    with open(root / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError("prometheus exited:\n" + (root / "prometheus.log").read_text())
        try:
            return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
        except OSError:
            return False
    wait_for(ready, 30, "prometheus ready")
    return proc, url


def drive_load(server: RunningServer, root: Path) -> list:
    """The mixed load of the module docstring; returns the failed calls' (tenant, code)."""
    admin = Caller(server.address, server.admin_token)
    acme = Caller(server.address, admin.new_tenant("acme", max_queued_requests=2))
    beta = Caller(server.address, admin.new_tenant("beta", max_tokens_per_minute=100))
    for i in range(1, 5):
        acme.upload(f"a{i}", tiny_adapter_dir(root / f"a{i}", seed=i))
    beta.upload("b1", tiny_adapter_dir(root / "b1", seed=9))
    job = beta.create_job("tuned", TRAINING_DATA, max_steps=100000, batch_size=2,
                          checkpoint_every=15, eval_fraction=0.25)
    short = admin.create_job("short", TRAINING_DATA, max_steps=2, batch_size=2)
    errors, stop = [], threading.Event()

    def call(caller: Caller, tenant: str, **request):
        try:
            caller.generate(**request)
        except grpc.RpcError as e:
            errors.append((tenant, e.code().name))

    def burst(caller: Caller, tenant: str, count: int, max_tokens: int):
        threads = [threading.Thread(target=call, args=(caller, tenant),
                                    kwargs=dict(prompt=f"the cat sat {i}", max_tokens=max_tokens))
                   for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def acme_loop():
        adapters = ["", "a1", "a2", "a3", "a4"]
        i = 0
        while not stop.wait(0.05):
            call(acme, "acme", adapter=adapters[i % len(adapters)], max_tokens=12)
            i += 1

    def beta_loop():
        i = 0
        while not stop.wait(0.2):
            call(beta, "beta", adapter=["", "b1"][i % 2], max_tokens=16)
            i += 1

    def bursts():
        while not stop.wait(3):
            burst(acme, "acme", 5, 40)  # past acme's 2 in flight: tenant_queue
            burst(admin, "admin", 12, 60)  # past the server's 8: server_queue; preemptions

    threads = [threading.Thread(target=f) for f in (acme_loop, beta_loop, bursts)]
    for t in threads:
        t.start()
    time.sleep(LOAD_S)
    stop.set()
    for t in threads:
        t.join()
    # However slow the machine, beta then spends what is left of its 100 tokens a minute
    # alone (nothing else is in flight): the refusal that the tokens_per_minute reason counts.
    for _ in range(10):
        refused = len(errors)
        call(beta, "beta", max_tokens=16)
        if len(errors) > refused:
            break
    # And whatever the timing of the bursts above, each other reason and a preemption for
    # sure: generations of 120 tokens outlast the starts of their burst's threads.
    burst(acme, "acme", 5, 120)  # 2 run, 3 refused: tenant_queue
    burst(admin, "admin", 12, 120)  # 8 run, 4 refused: server_queue; 8 x 8 blocks > 24
    beta.training.CancelJob(training_pb2.CancelJobRequest(id=job.id), metadata=beta.metadata)
    for caller, job_id in ((beta, job.id), (admin, short.id)):
        for event in caller.watch(job_id, timeout=60):
            if event.WhichOneof("event") == "state" and event.state in (
                    training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED,
                    training_pb2.JOB_STATE_CANCELLED):
                break
    for caller in (admin, acme, beta):
        caller.close()
    return errors


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard-live")
    tool("prometheus")
    metrics_port = free_port()
    # Later flags win: three slots for five adapters and the job's versions; a KV cache of
    # 384 tokens (24 blocks) that a burst of long generations overflows; 8 generations in
    # flight server-wide.
    server = start_server(root, "--metrics-port", str(metrics_port), "--num-slots", "3",
                          "--kv-cache-tokens", "384", "--max-queued-requests", "8")
    prometheus = None
    try:
        prometheus, url = start_prometheus(root, metrics_port)
        wait_for(lambda: query(url, "query", query='up{job="cotune"} == 1'), 30,
                 "first scrape of the server")
        start = time.time()
        errors = drive_load(server, root)
        time.sleep(3)  # the last scrapes
        yield Live(url, server, start, time.time(), errors)
    finally:
        server.stop()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)


def finite(result: list) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series["values"])


def test_the_load_provoked_refusals_evictions_preemptions_and_evals(live):
    print("refused calls by tenant:", {t: sum(1 for u, _ in live.errors if u == t)
                                       for t in ("admin", "acme", "beta")})
    codes = {code for _, code in live.errors}
    assert codes <= {"RESOURCE_EXHAUSTED"}, live.errors

    def now(expr: str) -> list:
        return query(live.prometheus, "query", query=expr, time=live.end)

    reasons = now('sum by (reason) (cotune_admission_rejections_total{job="cotune"})')
    assert {r["metric"]["reason"] for r in reasons} == {
        "server_queue", "tenant_queue", "tokens_per_minute"}
    for series in ("cotune_adapter_evictions_total", "cotune_preemptions_total"):
        assert now(f'{series}{{job="cotune"}} > 0'), f"no {series}"
    assert now('cotune_job_eval_loss{job="cotune", tenant="beta", adapter="tuned"}')
    assert now('cotune_jobs_finished_total{job="cotune", state="cancelled"}')
    assert now('cotune_jobs_finished_total{job="cotune", state="succeeded"}')


def test_every_panel_query_returns_data(live):
    empty = []
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            if not finite(live.query_range(expr)):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert empty == [], "panels that would show nothing"


def test_every_template_variable_finds_values(live):
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        selector, label = substitute(match[1]), match[2]
        found = {labels.get(label) for labels in query(
            live.prometheus, "series", **{"match[]": selector, "start": live.start,
                                          "end": live.end})}
        assert found - {None}, f"${variable['name']}: {selector} has no {label}"


def forced(rule: dict) -> str:
    """The rule's expression with its condition made true wherever its series exist:
    comparisons keep every sample (`bool`), `unless` becomes `and`, `absent(x)` becomes x."""
    expr = rule["expr"]
    for old, new in FORCE.get(rule["alert"], []):
        expr = expr.replace(old, new)
    expr = re.sub(r"(==|!=|>=|<=|>|<)(?!\s*bool)(?=\s*[\w(.+-])", r"\1 bool", expr)
    return expr.replace("unless", "and").replace("absent(", "(")


def test_every_alert_expression_returns_data_with_its_condition_forced(live):
    silent = []
    for rule in alert_rules():
        result = live.query_range(forced(rule))
        if not result:
            silent.append(f"{rule['alert']}: {forced(rule)}")
    assert silent == [], "alerts whose series are missing or do not join"


def test_the_rules_evaluate_without_errors(live):
    groups = query(live.prometheus, "rules")["groups"]
    rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
    assert len(rules) == len(alert_rules())
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    fired = sorted(r["name"] for r in rules if r["alerts"])
    print(f"alerts active at the end of the load (`for` 0): {fired}")


def test_the_panels_render_as_an_svg(live, tmp_path):
    out = tmp_path / "dashboard.svg"
    subprocess.run([sys.executable, str(RENDER_PANELS), "--prometheus", live.prometheus,
                    "--start", str(live.start), "--end", str(live.end), "--rate-interval", "10s",
                    "--out", str(out)],
                   check=True, timeout=60)
    svg = ET.parse(out).getroot()
    ns = {"svg": "http://www.w3.org/2000/svg"}
    drawn = svg.findall("svg:g[@class='panel']", ns)
    assert len(drawn) == 8
    for panel in drawn:
        lines = panel.findall("svg:polyline", ns) + panel.findall("svg:circle", ns)
        assert lines, f"{panel.get('data-title')}: nothing drawn"
    if os.environ.get("COTUNE_RENDER_DOCS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs/dashboard.svg").write_text(out.read_text())


def test_a_stopped_server_fires_server_down(live):
    """Last: it stops the server."""
    live.server.stop()

    def firing():
        return query(live.prometheus, "query",
                     query='ALERTS{alertname="CotuneServerDown", alertstate="firing"}')
    alerts = wait_for(firing, 30, "CotuneServerDown firing")
    assert alerts[0]["metric"]["instance"].startswith("127.0.0.1:")
    assert query(live.prometheus, "query", query='up{job=~".*cotune.*"} == 0')
