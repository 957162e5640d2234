"""`cotune bench adapters`: thousands of adapters per replica, through the three tiers.

`registered` real PEFT adapters (safetensors files on disk) are registered with a runtime
whose device slot pool holds `slots`. The same load (`requests` prompts of 8 to 16 tokens,
exactly `new_tokens` greedy tokens each, submitted in one burst, adapters round robin) runs
  on `few` distinct adapters: they stay resident, the ceiling;
  on `many` distinct adapters out of the registered ones: each request's adapter is read
  from disk into host memory on the loader thread while the request is queued, and copied
  into a slot when it is admitted;
each on a fresh runtime (cold host tier). A round runs both back to back, in alternating
order (few then many, then many then few, ...), so that the machine's drift, which reaches
15-20% within minutes on a shared 2-core VM, hits both alike. Reported: the ratio of
generated tokens per second (many / few) of each round and their median, the headline; the
best run of each and their ratio; p50/p99 adapter-load latency of each tier (disk->host,
host->device), the mean step time, and how often the scheduler passed over a request
because its adapter was still loading or no slot was free (counted per request and step).
The base is a tiny random Llama and the ranks small, so that it runs on a CPU in minutes;
the files were just written, so disk reads come from the OS page cache.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cotune.adapters.peft_format import save_peft_adapter
from cotune.adapters.synthetic import random_adapter
from cotune.bench.serving import machine
from cotune.engine.engine import Engine, EngineConfig
from cotune.engine.runtime import Request, Runtime
from cotune.model.llama import LORA_TARGETS
from cotune.model.loading import load_model


@dataclass(frozen=True)
class Setup:
    registered: int = 10_000
    many: int = 1000
    few: int = 8
    slots: int = 64
    requests: int = 2000
    new_tokens: int = 64  # as `bench serving`; each request's adapter is then used for 64 steps
    rounds: int = 6  # the machine drifts by 15-20%: more rounds, a steadier median
    rank: int = 8
    max_running: int = 32  # below the slots that hot adapters leave to the others (48 of 64)
    hidden: int = 256
    layers: int = 4


SMOKE = Setup(registered=120, many=40, few=4, slots=8, requests=60, new_tokens=4, rounds=2,
              rank=4, max_running=6, hidden=64, layers=2)
TARGETS = ["q_proj", "v_proj"]


def make_base(setup: Setup, directory: Path) -> Path:
    """A random Llama checkpoint of the setup's size (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=setup.hidden, intermediate_size=setup.hidden * 8 // 3,
                         num_hidden_layers=setup.layers, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def make_adapters(base: Path, setup: Setup, directory: Path) -> list[Path]:
    base_modules = {name: (m.in_features, m.out_features)
                    for name, m in load_model(base).lora_modules(LORA_TARGETS).items()}
    paths = []
    for i in range(setup.registered):
        paths.append(directory / f"adapter-{i}")
        save_peft_adapter(random_adapter(base_modules, setup.rank, TARGETS, seed=i), paths[-1])
    return paths


def new_runtime(base: Path, setup: Setup, adapters: list[Path]) -> Runtime:
    engine = Engine(load_model(base), config=EngineConfig(
        max_rank=setup.rank, num_slots=setup.slots, max_running=setup.max_running,
        kv_cache_tokens=setup.max_running * 64))
    runtime = Runtime(engine)
    for i, path in enumerate(adapters):
        runtime.register_adapter(f"bench/a{i}", path)
    return runtime


def serve(runtime: Runtime, prompts: list[list[int]], names: list[str],
          new_tokens: int) -> dict:
    """Runs the load once; tokens/s, the load latencies of each tier and the step times."""
    engine = runtime.engine
    host_loads, device_loads, steps = [], [], []
    engine.adapters.host.on_load = host_loads.append
    engine.adapters.on_load = device_loads.append
    engine.on_step = lambda report: steps.append(report.seconds)
    requests = [Request(prompt_token_ids=p, adapter=names[i % len(names)],
                        max_tokens=new_tokens, ignore_eos=True)
                for i, p in enumerate(prompts)]
    started = time.perf_counter()
    completions = runtime.generate(requests)
    seconds = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in completions)
    counters = engine.scheduler.counters
    return {"adapters": len(names), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "steps": len(steps),
            "mean_step_ms": 1e3 * float(np.mean(steps)),
            "disk_to_host": latencies(host_loads), "host_to_device": latencies(device_loads),
            "passed_over_loading": counters["admission_loading"],
            "passed_over_no_slot": counters["admission_no_slot"]}


def latencies(seconds: list[float]) -> dict:
    if not seconds:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(np.array(seconds) * 1e3, [50, 99])
    return {"count": len(seconds), "p50_ms": float(p50), "p99_ms": float(p99)}


def run(smoke: bool, setup: Setup | None = None) -> dict:
    setup = setup or (SMOKE if smoke else Setup())
    threads = torch.get_num_threads()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="cotune-bench-adapters-") as tmp:
        base = make_base(setup, Path(tmp) / "base")
        started = time.perf_counter()
        paths = make_adapters(base, setup, Path(tmp))
        written_s = time.perf_counter() - started
        prompts = [[rng.randrange(2048) for _ in range(rng.randint(8, 16))]
                   for _ in range(setup.requests)]
        loads = {"few": rng.sample(range(setup.registered), setup.few),
                 "many": rng.sample(range(setup.registered), setup.many)}
        runs = {name: [] for name in loads}
        for round_ in range(setup.rounds):
            for name in ("few", "many") if round_ % 2 == 0 else ("many", "few"):
                chosen = loads[name]
                with new_runtime(base, setup, paths) as runtime:
                    runs[name].append(serve(runtime, prompts, [f"bench/a{i}" for i in chosen],
                                            setup.new_tokens))
        torch.set_num_threads(threads)  # the runtime's thread set it for the whole process
    best = {name: max(r, key=lambda r: r["tokens_per_s"]) for name, r in runs.items()}
    round_ratios = [many["tokens_per_s"] / few["tokens_per_s"]
                    for few, many in zip(runs["few"], runs["many"])]
    return {
        "benchmark": "adapters", "smoke": smoke, "machine": machine(), "device": "cpu",
        "setup": asdict(setup), "adapters_written_s": written_s, "runs": runs, "best": best,
        "round_ratios": round_ratios, "throughput_ratio": float(np.median(round_ratios)),
        "best_ratio": best["many"]["tokens_per_s"] / best["few"]["tokens_per_s"],
    }


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("adapters-smoke" if result["smoke"] else "adapters")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    s, best = result["setup"], result["best"]
    lines = [f"# Adapters: {s['many']} distinct of {s['registered']} registered, "
             f"{s['slots']} device slots, against {s['few']} distinct",
             "", f"Machine: {result['machine']} (device: {result['device']})", "",
             f"{s['requests']} requests x {s['new_tokens']} new tokens in one burst, rank "
             f"{s['rank']} on {', '.join(TARGETS)}, at most {s['max_running']} running; a "
             f"{s['layers']}-layer, {s['hidden']}-wide random Llama; {s['rounds']} rounds, "
             "each running both back to back in alternating order; the table shows each one's "
             "best run.", "",
             "| distinct adapters | tokens/s | mean step ms | disk->host p50 / p99 ms (n) "
             "| host->device p50 / p99 ms (n) | passed over: loading / no slot |",
             "|---|---|---|---|---|---|"]
    for run in best.values():
        lines.append(f"| {run['adapters']} | {run['tokens_per_s']:.1f} | "
                     f"{run['mean_step_ms']:.2f} | {_tier(run['disk_to_host'])} | "
                     f"{_tier(run['host_to_device'])} | {run['passed_over_loading']} / "
                     f"{run['passed_over_no_slot']} |")
    ratios = ", ".join(f"{r:.3f}x" for r in result["round_ratios"])
    lines += ["", f"Throughput at {s['many']} distinct / at {s['few']}: "
              f"{result['throughput_ratio']:.3f}x, the median of the rounds ({ratios}); "
              f"best run / best run: {result['best_ratio']:.3f}x", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem


def _tier(latency: dict) -> str:
    if not latency["count"]:
        return "none"
    return f"{latency['p50_ms']:.3f} / {latency['p99_ms']:.3f} ({latency['count']})"
