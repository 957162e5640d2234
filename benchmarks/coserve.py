"""`cotune bench coserve`: serving SLOs and training speed when serving and fine-tuning share
one machine, measured as a client sees them: real `cotune serve` processes and the SDK.

1. Capacity: the server with no job, `concurrency` requests kept in flight for `duration`
   seconds: finished requests per second. Unloaded: one request at a time.
2. Rates: fractions of the capacity (25, 50, 75 and 90%), Poisson arrivals over `adapters`
   rank-16 adapters; each request stops at EOS or `new_tokens`.
3. Systems at each rate, interleaved over `rounds` rounds (medians reported):
     serving     the server alone
     coserve     the same server while one job trains (no floor), as `cotune serve` runs it
                 by default: on a CPU with cores the serving steps leave idle, the job on a
                 training lane beside them (--training-threads), else in the same steps
     in-steps    a server started with --training-threads 0: the job in the serving steps'
                 passes, in the room the SLO targets leave
     time-slice  a server started with --time-slice: serving only, then training only
     split       two servers on half the cores each: one serves, the other trains
   and once a round, `training`: the job alone on the serving server. Serving alone runs
   first at each rate in a round; the co-serving, in-steps and time-sliced servers are started
   for that rate with its SLOs as their targets (`--ttft-target`, `--tpot-target`, at
   TARGET_SHARE of the SLOs so far), as an operator would deploy them for it.
4. SLOs at each rate: TTFT <= 2 x and TPOT <= 1.5 x the p90 that serving alone got at that
   rate (median over rounds). A request that failed counts as missed.
Meanwhile a prober calls GetJob, ListJobs and health every 0.1 s on the busy server (p99), and
at the end SIGTERM goes to the co-serving server while it serves and trains (exit time).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cotune.adapters.peft_format import save_peft_adapter
from cotune.adapters.synthetic import random_adapter
from cotune.bench.server_process import ServerProcess, start_server
from cotune.bench.serving import RANK, machine
from cotune.client import Client
from cotune.client.errors import CotuneError
from cotune.engine.engine import EngineConfig
from cotune.model.config import ModelConfig
from cotune.model.default_model import resolve_model_path
from cotune.model.llama import CausalLM
from cotune.model.targets import LORA_TARGETS

LOADS = (0.25, 0.5, 0.75, 0.9)
SYSTEMS = ("serving", "coserve", "in-steps", "time-slice", "split")
GRACE_S = 5.0
TARGET_SHARE = 0.9  # the servers' SLO targets, as a share of the SLOs: a margin for the p90
_SENTENCES = ["The river runs past the old mill and into the valley below the town.",
              "Every morning the baker opens the shop well before the sun rises.",
              "A good map shows the roads, the rivers, the hills and the old bridges.",
              "The library keeps its oldest books in a cool and very dry room."]
_TOPICS = ["a river", "the sea", "a mountain", "a library", "bread", "a bridge", "a map",
           "the rain"]
# SmolLM2-Instruct's chat template, as a chat client sends it
_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Outcome:
    """One request as the client saw it."""

    ttft_s: float | None  # None: it failed
    tpot_s: float | None  # None: fewer than two tokens
    tokens: int


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _one(client: Client, i: int, adapters: list[str], new_tokens: int) -> Outcome:
    started, first, last, tokens = time.monotonic(), None, None, 0
    try:
        prompt = _CHAT.format(f"Write two sentences about {_TOPICS[i % len(_TOPICS)]}.")
        for delta in client.generate(prompt, adapter=adapters[i % len(adapters)],
                                     max_tokens=new_tokens, timeout=600):
            if delta.token_ids:
                now = time.monotonic()
                first = first or now
                last = now
                tokens += len(delta.token_ids)
    except CotuneError:  # what the SDK raises for a failed call
        return Outcome(None, None, tokens)
    if first is None:
        return Outcome(None, None, 0)
    return Outcome(first - started, (last - first) / (tokens - 1) if tokens > 1 else None, tokens)


def _poisson(client: Client, rate: float, duration: float, seed: int, adapters: list[str],
             new_tokens: int) -> list[Outcome]:
    """Requests arriving at `rate` per second for `duration` seconds, each in its own thread;
    returns once every one has ended."""
    rng, at, arrivals = random.Random(seed), 0.0, []
    while (at := at + rng.expovariate(rate)) < duration:
        arrivals.append(at)
    outcomes: list[Outcome | None] = [None] * len(arrivals)
    threads, started = [], time.monotonic()

    def run(i: int) -> None:
        outcomes[i] = _one(client, i, adapters, new_tokens)

    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, started + at - time.monotonic()))
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return outcomes


def _closed_loop(client: Client, concurrency: int, duration: float, adapters: list[str],
                 new_tokens: int) -> float:
    """Finished requests per second with `concurrency` requests always in flight."""
    finished, stop = [], time.monotonic() + duration

    def worker(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            _one(client, i, adapters, new_tokens)
            finished.append(time.monotonic())
            i += concurrency

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(finished) / (time.monotonic() - started)


class Prober:
    """GetJob, ListJobs and health every `period_s` while a point runs: their latencies."""

    def __init__(self, client: Client, address: str, job_id: str | None, period_s: float = 0.1):
        self.client, self.job_id, self.period_s = client, job_id, period_s
        self.channel = grpc.insecure_channel(address)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        calls = [lambda: self.health.Check(health_pb2.HealthCheckRequest(), timeout=30),
                 lambda: next(iter(self.client.jobs.list(page_size=10)), None)]
        if self.job_id is not None:
            calls.append(lambda: self.client.jobs.get(self.job_id))
        i = 0
        while not self._stop.wait(self.period_s):
            started = time.monotonic()
            calls[i % len(calls)]()
            self.latencies.append(time.monotonic() - started)
            i += 1

    def close(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        self.channel.close()
        return self.latencies


class Server:
    """A `cotune serve` on the default model with the benchmark's adapters, and its client."""

    def __init__(self, workdir: Path, name: str, adapters: list[Path], *flags: str):
        self.process: ServerProcess = start_server(
            workdir / name, "--grace-period", str(GRACE_S), "--num-slots",
            str(len(adapters) + 4), *flags)
        self.data_dir = workdir / name
        self.client = Client(self.process.address, self.process.admin_token)
        for i, path in enumerate(adapters):
            self.client.adapters.create(f"a{i}", path)
        self.adapters = [f"a{i}" for i in range(len(adapters))]
        self.data = _training_data(workdir)
        self.job_id: str | None = None

    def start_job(self) -> None:
        self.job_id = self.client.jobs.create(
            f"job-{time.monotonic_ns()}", self.data, rank=RANK, alpha=2 * RANK, batch_size=4,
            epochs=10_000, max_length=64, seed=0).id
        while self.client.jobs.get(self.job_id).tokens == 0:  # its first steps are done
            time.sleep(0.2)

    def trained_tokens(self) -> int:
        return self.client.jobs.get(self.job_id).tokens

    def stop_job(self) -> None:
        self.client.jobs.cancel(self.job_id)
        while not self.client.jobs.get(self.job_id).done:
            time.sleep(0.1)
        self.job_id = None

    def close(self) -> float:
        self.client.close()
        return self.process.stop()


def _training_data(workdir: Path) -> Path:
    path = workdir / "train.jsonl"
    if not path.exists():
        lines = [json.dumps({"text": f"{a} {b} Note {i}."}) for i in range(64)
                 for a, b in zip(_SENTENCES, _SENTENCES[1:] + _SENTENCES[:1])]
        path.write_text("\n".join(lines) + "\n")
    return path


def _make_adapters(count: int, workdir: Path) -> list[Path]:
    """`count` random rank-16 PEFT adapters on all seven projections of the default model."""
    with torch.device("meta"):  # shapes only
        model = CausalLM(ModelConfig.from_dir(resolve_model_path("default")))
    shapes = {name: (m.in_features, m.out_features) for name, m in model.lora_modules().items()}
    paths = []
    for i in range(count):
        paths.append(workdir / "adapters" / f"a{i}")
        save_peft_adapter(random_adapter(shapes, RANK, list(LORA_TARGETS), seed=i, b_std=0.01),
                          paths[-1])
    return paths


def _trained_per_s(server: Server, work) -> tuple[float, object]:
    """(training tokens per second on `server` while `work()` runs, what work returned)."""
    before, started = server.trained_tokens(), time.monotonic()
    result = work()
    return (server.trained_tokens() - before) / (time.monotonic() - started), result


def run(duration: float, num_adapters: int, new_tokens: int, rounds: int, slice_s: float,
        concurrency: int, out_dir: Path, loads=LOADS, threads: int | None = None) -> dict:
    """`threads`: torch threads of the shared and time-sliced servers (default: the engine's,
    half the cores; on 2 cores, 2 threads served with 2-10x the TTFT of 1)."""
    workdir = Path(tempfile.mkdtemp(prefix="cotune-coserve-"))
    adapters = _make_adapters(num_adapters, workdir)
    cores = os.cpu_count() or 2
    half = max(1, cores // 2)
    threads = threads or half
    shared = Server(workdir, "shared", adapters, "--threads", str(threads))
    split_serve = Server(workdir, "split-serve", adapters, "--threads", str(half))
    split_train = Server(workdir, "split-train", adapters, "--threads", str(half))
    try:
        unloaded = [_one(shared.client, i, shared.adapters, new_tokens) for i in range(8)]
        capacity = _closed_loop(shared.client, concurrency, duration, shared.adapters,
                                new_tokens)
        rates = [round(load * capacity, 3) for load in loads]
        points: list[dict] = []
        for r in range(rounds):
            shared.start_job()
            solo, _ = _trained_per_s(shared, lambda: time.sleep(duration))
            shared.stop_job()
            points.append(dict(round=r, system="training", rate=0.0, trained_per_s=solo))
            for load, rate in zip(loads, rates):
                others = SYSTEMS[1:]
                order = others[r % len(others):] + others[:r % len(others)]
                for system in ("serving", *order):  # serving first: the SLOs come from it
                    targets = None if system == "serving" else [
                        TARGET_SHARE * slo for slo in _slos(points, load)]
                    point = _point(system, workdir, adapters, shared, split_serve,
                                   split_train, rate, duration, r, new_tokens, threads,
                                   targets, slice_s)
                    points.append(point | dict(round=r, system=system, load=load, rate=rate,
                                               targets=targets))
        shared.start_job()  # SIGTERM while it serves and trains
        load_thread = threading.Thread(target=_poisson, daemon=True, args=(
            shared.client, rates[len(rates) // 2], duration, 99, shared.adapters, new_tokens))
        load_thread.start()
        time.sleep(duration / 2)
        sigterm_exit_s = shared.process.stop()
        load_thread.join()  # its later calls fail on the stopped server, not a closed channel
    finally:
        for server in (shared, split_serve, split_train):
            server.close()
    result = _summarise(points, capacity, rates, loads, unloaded, sigterm_exit_s)
    result.update(benchmark="coserve", machine=machine(), model="SmolLM2-135M-Instruct",
                  duration_s=duration, rounds=rounds, adapters=num_adapters, rank=RANK,
                  new_tokens=new_tokens, slice_s=slice_s, concurrency=concurrency,
                  threads={"shared": threads, "split": half,
                           "lane": EngineConfig(num_threads=threads).idle_cores("cpu")},
                  grace_s=GRACE_S,
                  target_share=TARGET_SHARE,
                  points=points)
    write(result, out_dir)
    return result


def _point(system: str, workdir: Path, adapters: list[Path], shared: Server,
           split_serve: Server, split_train: Server, rate: float, duration: float, seed: int,
           new_tokens: int, threads: int, targets: list[float] | None, slice_s: float) -> dict:
    """One system at one rate. The co-serving and time-sliced servers start for the point,
    with `targets` (TTFT, TPOT seconds) as their SLO targets."""
    fresh = None
    if system in ("coserve", "in-steps", "time-slice"):
        flags = ["--threads", str(threads), "--ttft-target", f"{targets[0]:.4f}",
                 "--tpot-target", f"{targets[1]:.4f}"]
        flags += {"coserve": [], "in-steps": ["--training-threads", "0"],
                  "time-slice": ["--time-slice", str(slice_s)]}[system]
        fresh = Server(workdir, f"{system}-{seed}-{rate}", adapters, *flags)
    serving, training = {"serving": (shared, None), "coserve": (fresh, fresh),
                         "in-steps": (fresh, fresh), "time-slice": (fresh, fresh),
                         "split": (split_serve, split_train)}[system]
    try:
        if training is not None:
            training.start_job()
        prober = Prober(serving.client, serving.process.address, training.job_id
                        if training is serving else None)

        def load():
            return _poisson(serving.client, rate, duration, seed * 1000 + int(rate * 1000),
                            serving.adapters, new_tokens)

        if training is None:
            trained, outcomes = 0.0, load()
        else:
            trained, outcomes = _trained_per_s(training, load)
            training.stop_job()
        unary = prober.close()
    finally:
        if fresh is not None:
            fresh.close()
            shutil.rmtree(fresh.data_dir, ignore_errors=True)
    return dict(trained_per_s=trained, unary_p99_s=_quantile(unary, 0.99),
                requests=[(o.ttft_s, o.tpot_s) for o in outcomes],
                tokens=sum(o.tokens for o in outcomes))


def _p90(point: dict, index: int) -> float | None:
    """The p90 of a point's TTFTs (index 0) or TPOTs (1), over the requests that have one."""
    return _quantile([r[index] for r in point["requests"] if r[index] is not None], 0.9)


def _slos(points: list[dict], load: float) -> tuple[float, float]:
    """(TTFT, TPOT) SLOs at `load`: 2 x and 1.5 x the p90s of serving alone there (medians
    over the rounds so far)."""
    alone = [p for p in points if p.get("load") == load and p["system"] == "serving"]
    return 2 * _median(_p90(p, 0) for p in alone), 1.5 * _median(_p90(p, 1) for p in alone)


def _summarise(points, capacity, rates, loads, unloaded, sigterm_exit_s) -> dict:
    solo = _median(p["trained_per_s"] for p in points if p["system"] == "training")
    rows = []
    for load, rate in zip(loads, rates):
        at_rate = [p for p in points if p.get("load") == load]
        ttft_slo, tpot_slo = _slos(points, load)
        for system in SYSTEMS:
            runs = [p for p in at_rate if p["system"] == system]
            trained = _median(p["trained_per_s"] for p in runs)
            rows.append(dict(
                load=load, rate=rate, system=system,
                slo_attainment=_median(_attainment(p, ttft_slo, tpot_slo) for p in runs),
                ttft_p90_s=_median(_p90(p, 0) for p in runs),
                tpot_p90_s=_median(_p90(p, 1) for p in runs),
                trained_per_s=trained,
                training_vs_share=None if system == "serving" or not solo
                else trained / ((1 - load) * solo),
                unary_p99_s=_median(p["unary_p99_s"] for p in runs),
                ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo))
    return dict(capacity_rps=capacity, rates=rates, solo_trained_per_s=solo,
                unloaded_ttft_p90_s=_quantile([o.ttft_s for o in unloaded
                                               if o.ttft_s is not None], 0.9),
                unloaded_tpot_p50_s=_quantile([o.tpot_s for o in unloaded
                                               if o.tpot_s is not None], 0.5),
                sigterm_exit_s=sigterm_exit_s, rows=rows)


def _attainment(point: dict, ttft_slo: float, tpot_slo: float) -> float | None:
    """Requests that met both SLOs over all that arrived (a failed one missed; one of a
    single token has no TPOT to miss)."""
    requests = point["requests"]
    if not requests:
        return None
    met = sum(ttft is not None and ttft <= ttft_slo and (tpot is None or tpot <= tpot_slo)
              for ttft, tpot in requests)
    return met / len(requests)


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "coserve.json").write_text(json.dumps(result, indent=1) + "\n")

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [f"# Co-serving through the server: {result['adapters']} rank-{result['rank']} "
             f"adapters, requests of up to {result['new_tokens']} tokens, one fine-tuning job",
             "", f"Machine: {result['machine']}. Threads: {result['threads']['shared']} for the "
             f"serving steps of the shared, co-serving, in-steps and time-sliced servers, "
             f"{result['threads']['split']} for each split one; the co-serving server's "
             f"training lane: {result['threads']['lane']} (0: none, the job in the steps). "
             f"{result['duration_s']:.0f} s a point, {result['rounds']} interleaved rounds, "
             f"medians; time slices of {result['slice_s']} s.", "",
             f"Capacity: {result['capacity_rps']:.2f} requests/s with "
             f"{result['concurrency']} in flight. Unloaded request: TTFT p90 "
             f"{result['unloaded_ttft_p90_s']:.3f} s, TPOT p50 "
             f"{result['unloaded_tpot_p50_s']:.3f} s. Training alone: "
             f"{fmt(result['solo_trained_per_s'], '.1f')} tokens/s. SIGTERM while serving and "
             f"training: exit in {result['sigterm_exit_s']:.1f} s (grace {result['grace_s']} s).",
             "", "SLOs at each rate: TTFT <= 2 x and TPOT <= 1.5 x the p90 of serving alone. "
             "The co-serving, in-steps and time-sliced servers are started at each rate with "
             f"{result['target_share']:.0%} of its SLOs as their targets (--ttft-target, "
             "--tpot-target).",
             "", "| load | req/s | system | SLO met | TTFT p90 (s) | TPOT p90 (s) | training "
             "tok/s | vs (1-load) x alone | unary p99 (ms) |", "|---|---|---|---|---|---|---|---|"
             "---|"]
    for row in result["rows"]:
        unary = None if row["unary_p99_s"] is None else row["unary_p99_s"] * 1000
        lines.append(
            f"| {row['load']:.0%} | {row['rate']:.2f} | {row['system']} | "
            f"{fmt(row['slo_attainment'], '.0%')} | {fmt(row['ttft_p90_s'], '.2f')} | "
            f"{fmt(row['tpot_p90_s'], '.3f')} | {fmt(row['trained_per_s'], '.1f')} | "
            f"{fmt(row['training_vs_share'], '.0%')} | {fmt(unary, '.0f')} |")
    (out_dir / "coserve.md").write_text("\n".join(lines) + "\n")
