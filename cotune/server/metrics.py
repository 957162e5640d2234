"""Prometheus metrics of one `cotune serve`, on --metrics-port (/metrics).

Counters and histograms, never pre-computed rates; units in the names. Label sets are
bounded: `tenant` by the registry (tenants are created by admins), `adapter` by
`AdapterLabels` (the busiest N adapter names of the tenant, the rest as "other"), `status`
by the gRPC codes, `reason`, `kind` and `protocol` by the lists below. `protocol` says which
front a call came through: "http" for the OpenAI-compatible front (which marks its calls
underneath with PROTOCOL_METADATA), "grpc" for every other call.

Who feeds what:
- the InferenceService: requests, latencies, prompt and generated tokens, admissions;
- the engine, after each step (`Engine.on_step`): step composition and time, and the time
  spent on training rows; after each pass of its training lane (`Engine.on_training_pass`):
  the pass's time and tokens;
- `EngineCollector` at scrape time: queue depth, KV cache, preemptions, slots, SLO counters
  per tenant;
- the adapter residency (`ResidentAdapters.on_load` / `on_evict`): loads into device slots,
  evictions, host->device time; its host cache (`HostCache.on_load`): disk->host time, and
  its size in bytes and adapters (read at scrape time);
- the JobManager: per-job steps, tokens, loss, eval loss and job states.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OTHER = "other"
PROTOCOLS = ("grpc", "http")
PROTOCOL_METADATA = "cotune-protocol"
REJECTION_REASONS = ("server_queue", "tenant_queue", "tokens_per_minute")
STEP_TOKEN_KINDS = ("decode", "prefill", "training", "backward")
SLO_KINDS = ("ttft", "tpot", "both")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# A lane's pass takes a room of half a second (training_lane.PASS_SECONDS), more where one
# piece of an example takes longer.
PASS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
# Adapter loads take from a tenth of a millisecond (a small adapter, host to device) to seconds.
LOAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1, 2.5, 10)


class AdapterLabels:
    """The label of an adapter: its name while it is among the `top` busiest of its tenant
    (by requests, recounted every `period_s`), else "other". A million adapters cost at most
    `top` label values per tenant."""

    def __init__(self, top: int = 20, period_s: float = 60.0):
        self.top, self.period_s = top, period_s
        self._counts: dict[str, Tally[str]] = {}
        self._named: dict[str, set[str]] = {}
        self._recounted = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, tenant: str, adapter: str) -> str:
        if not adapter:
            return ""  # the base model
        with self._lock:
            counts = self._counts.setdefault(tenant, Tally())
            counts[adapter] += 1
            named = self._named.setdefault(tenant, set())
            if len(named) < self.top:
                named.add(adapter)
            elif time.monotonic() - self._recounted > self.period_s:
                self._recount()
            return adapter if adapter in named else OTHER

    def _recount(self) -> None:
        for tenant, counts in self._counts.items():
            self._named[tenant] = {name for name, _ in counts.most_common(self.top)}
            self._counts[tenant] = Tally(dict(counts.most_common(self.top * 10)))  # bounded
        self._recounted = time.monotonic()


def protocol_of(context) -> str:
    """The `protocol` label of a gRPC call: its PROTOCOL_METADATA when that is one of
    PROTOCOLS, else "grpc" (any other value would make the label set unbounded)."""
    values = [v for k, v in context.invocation_metadata() if k == PROTOCOL_METADATA]
    return values[0] if len(values) == 1 and values[0] in PROTOCOLS else PROTOCOLS[0]


class Metrics:
    """Every metric of the server, in a registry of its own (so tests can run several)."""

    def __init__(self, top_adapters: int = 20):
        r = self.registry = CollectorRegistry()
        self.adapter_label = AdapterLabels(top_adapters)
        # Requests and latency.
        # Per call: each by the `protocol` of the front the call came through.
        self.requests = Counter("cotune_requests", "Generate calls by final gRPC status",
                                ["tenant", "adapter", "status", "protocol"], registry=r)
        self.ttft = Histogram("cotune_time_to_first_token_seconds",
                              "arrival to first token", ["tenant", "protocol"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("cotune_inter_token_latency_seconds",
                                     "time between a request's successive tokens",
                                     ["tenant", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("cotune_request_duration_seconds", "arrival to the last token",
                             ["tenant", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cotune_prompt_tokens", "prompt tokens of admitted requests",
                                     ["tenant", "adapter", "protocol"], registry=r)
        self.generated_tokens = Counter("cotune_generated_tokens", "tokens generated",
                                        ["tenant", "adapter", "protocol"], registry=r)
        self.rejections = Counter("cotune_admission_rejections",
                                  "generations refused at admission",
                                  ["tenant", "reason", "protocol"], registry=r)
        self.open_stream_refusals = Counter(
            "cotune_open_stream_refusals",
            "uploads, exports and job watches refused past --max-open-streams or "
            "--max-open-streams-per-tenant", ["tenant", "protocol"],
            registry=r)
        self.in_flight = Gauge("cotune_requests_in_flight", "admitted generations not yet done",
                               ["tenant", "protocol"], registry=r)
        # Steps.
        self.step_tokens = Counter("cotune_step_tokens", "tokens computed in engine steps and "
                                   "the passes of its training lane", ["kind"], registry=r)
        self.step_tokens_per_step = Histogram(
            "cotune_step_batch_tokens", "tokens of one step, by kind", ["kind"],
            buckets=TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("cotune_step_duration_seconds", "one engine step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.step_training_seconds = Counter(
            "cotune_step_training_seconds", "seconds of engine steps spent on training rows "
            "(their backward, and their share of the forward)", registry=r)
        self.training_pass_seconds = Histogram(
            "cotune_training_pass_duration_seconds", "one pass of the training lane (a job's "
            "forward, backward and optimizer steps beside the serving steps)",
            buckets=PASS_BUCKETS, registry=r)
        # Adapters.
        self.adapter_evictions = Counter("cotune_adapter_evictions",
                                         "adapters evicted from a slot", registry=r)
        self.adapter_loads = Counter("cotune_adapter_loads", "adapters loaded into a slot",
                                     registry=r)
        self.adapter_load_seconds = Histogram("cotune_adapter_load_duration_seconds",
                                              "copying one adapter from host memory into a slot",
                                              buckets=LOAD_BUCKETS, registry=r)
        self.adapter_host_load_seconds = Histogram(
            "cotune_adapter_host_load_duration_seconds",
            "reading one adapter from disk into host memory", buckets=LOAD_BUCKETS, registry=r)
        # Training.
        self.training_tokens = Counter("cotune_training_tokens", "tokens trained on",
                                       ["tenant", "adapter"], registry=r)
        self.job_steps = Counter("cotune_job_steps", "optimizer steps of jobs",
                                 ["tenant", "adapter"], registry=r)
        self.job_loss = Gauge("cotune_job_loss", "training loss of a running job's last step",
                              ["tenant", "adapter"], registry=r)
        self.job_eval_loss = Gauge("cotune_job_eval_loss", "eval loss at a job's last version",
                                   ["tenant", "adapter"], registry=r)
        self.jobs_finished = Counter("cotune_jobs_finished", "jobs that ended, by state",
                                     ["tenant", "state"], registry=r)


    def watch(self, runtime) -> None:
        """Feeds the metrics from the runtime's engine: its steps, its adapter loads and
        evictions, and what it counts (read at scrape time)."""
        engine = runtime.engine
        engine.on_step = self._observe_step
        engine.on_training_pass = self._observe_training_pass
        engine.adapters.on_load = self._observe_load
        engine.adapters.on_evict = self.adapter_evictions.inc
        engine.adapters.host.on_load = self.adapter_host_load_seconds.observe
        self.registry.register(EngineCollector(runtime))

    def _observe_load(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.adapter_load_seconds.observe(seconds)

    def _observe_step(self, report) -> None:
        self.step_seconds.observe(report.seconds)
        if report.training_seconds:
            self.step_training_seconds.inc(report.training_seconds)
        for kind in STEP_TOKEN_KINDS:
            tokens = getattr(report, f"{kind}_tokens")
            if tokens:
                self.step_tokens.labels(kind).inc(tokens)
                self.step_tokens_per_step.labels(kind).observe(tokens)

    def _observe_training_pass(self, done) -> None:
        self.training_pass_seconds.observe(done.seconds)
        for kind, tokens in (("training", done.forward_tokens),
                             ("backward", done.backward_tokens)):
            if tokens:
                self.step_tokens.labels(kind).inc(tokens)


class EngineCollector:
    """What the engine already counts, read at scrape time (no work on the step path)."""

    def __init__(self, runtime):
        self.runtime = runtime

    def collect(self):
        engine = self.runtime.engine
        counters, cache, slots = engine.scheduler.counters, engine.cache, engine.adapters
        yield _gauge("cotune_queue_depth", "requests waiting for their first step",
                     len(engine.scheduler.waiting))
        yield _gauge("cotune_running_requests", "requests with tokens in the KV cache",
                     len(engine.scheduler.running))
        yield _gauge("cotune_kv_cache_usage_ratio", "share of KV-cache blocks in use",
                     1 - cache.free_blocks / cache.num_blocks)
        yield _counter("cotune_preemptions", "requests preempted to free KV-cache blocks",
                       counters["preemptions"])
        yield _gauge("cotune_adapter_slots_used", "device adapter slots holding an adapter",
                     slots.num_resident)
        yield _gauge("cotune_adapter_slots", "device adapter slots", slots.num_slots)
        yield _gauge("cotune_adapter_host_cache_bytes", "bytes of adapters in host memory",
                     slots.host.size_bytes)
        yield _gauge("cotune_adapter_host_cache_adapters", "adapters in host memory",
                     slots.host.num_adapters)
        sessions = len(engine.sessions)
        yield _gauge("cotune_jobs_running", "fine-tuning jobs in the engine",
                     len(engine.trainers) - sessions)
        yield _gauge("cotune_rl_sessions_open", "RL sessions in the engine", sessions)
        slo = CounterMetricFamily("cotune_slo_requests", "finished requests by whether they met "
                                  "their latency target", labels=["tenant", "kind", "result"])
        counts = engine.slo_counts
        for tenant in sorted({tenant for tenant, _, _ in counts}):
            for kind in SLO_KINDS:  # zeros too: a ratio of missed to all needs both series
                for result in ("met", "missed"):
                    slo.add_metric([tenant, kind, result], counts[tenant, kind, result])
        yield slo


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
