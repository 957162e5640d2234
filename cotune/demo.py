"""What `make run` shows at this stage: the default base serving a mixed batch of adapters.

Two LoRA adapters are made up on the spot (random weights, real PEFT files), then one batch
runs four requests (two on the base, one on each adapter) through shared forward passes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cotune.adapters.peft_format import save_peft_adapter
from cotune.adapters.synthetic import random_adapter
from cotune.engine.runtime import Request, Runtime

_DEMO_ADAPTERS = {"demo-r8-attention": (8, ["q_proj", "v_proj"]),
                  "demo-r16-everywhere": (16, ["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"])}


def run_demo(model: str = "default", dtype: str | None = None, quantize: str | None = None,
             max_rank: int = 64) -> None:
    started = time.perf_counter()
    with Runtime.load(model, dtype=dtype, quantize=quantize, max_rank=max_rank,
                      num_slots=len(_DEMO_ADAPTERS)) as runtime:
        config = runtime.engine.model.config
        print(f"loaded {runtime.model_path} in {time.perf_counter() - started:.1f}s: "
              f"{config.num_layers} layers, hidden {config.hidden_size}, "
              f"vocab {config.vocab_size}")
        _serve_mixed_batch(runtime)


def _serve_mixed_batch(runtime: Runtime) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cotune-demo-"))
    paths = {}
    for seed, (name, (rank, targets)) in enumerate(_DEMO_ADAPTERS.items()):
        paths[name] = workdir / name
        adapter = random_adapter(runtime.engine.adapters.base_modules, rank, targets, seed)
        save_peft_adapter(adapter, paths[name])
        print(f"wrote adapter {name} (rank {rank}, targets {','.join(targets)}) "
              f"to {paths[name]}")
    question = "What is the capital of France?"
    prompt = runtime.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    requests = [Request(prompt=prompt, max_tokens=24),
                Request(prompt=prompt, adapter=str(paths["demo-r8-attention"]), max_tokens=24),
                Request(prompt=prompt, adapter=str(paths["demo-r16-everywhere"]), max_tokens=24),
                Request(prompt="The three primary colours are", max_tokens=24)]
    started = time.perf_counter()
    completions = runtime.generate(requests)
    elapsed = time.perf_counter() - started
    tokens = sum(c.completion_tokens for c in completions)
    steps = runtime.engine.scheduler.counters["steps"]
    print(f"\none mixed batch: {len(requests)} requests on 3 adapters (base included), "
          f"{tokens} tokens in {elapsed:.1f}s over {steps} engine steps; every step ran one "
          "forward pass for all of them")
    for request, completion in zip(requests, completions):
        adapter = Path(request.adapter).name if request.adapter else "base"
        shown = question if request.prompt == prompt else request.prompt
        print(f"\n[{adapter}] {shown}\n  -> {completion.text.strip()!r}")
