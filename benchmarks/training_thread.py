"""Whether a job's passes on a thread of their own, beside the engine's serving steps, would
use the cores that co-serving in one pass leaves idle.

    .venv/bin/python -m cotune.bench.training_thread [--seconds 12] [--rounds 2]

One process, one SmolLM2, one torch thread per Python thread. Serving: the engine steps 8
requests of 32 tokens on 8 adapters, new ones queued as they finish. Training: forward and
backward passes over one 64-token example with a trainable LoRA on the same model. Each runs
alone, then both at once, in interleaved rounds; tokens per second of each, medians. When
both keep most of their solo speed together, the GIL is not what stops a second thread (torch
releases it inside its ops) and the cores are there to be used.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from cotune.bench.coserve import _CHAT, _TOPICS, RANK, _make_adapters, _training_data
from cotune.engine.evaluation import shifted_targets
from cotune.engine.finetune_spec import FinetuneSpec, LoraSettings
from cotune.engine.runtime import Runtime
from cotune.engine.sampling import SamplingParams
from cotune.engine.trainer import Trainer
from cotune.model.llama import ForwardBatch
from cotune.model.lora_routing import LoraRouting

Loop = Callable[[threading.Event], int]  # runs until the event is set; returns its tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cotune-training-thread-"))
    adapters = _make_adapters(8, workdir)
    runtime = Runtime.load("default", num_slots=12, num_threads=1)
    runtime.close()  # its thread ends: the loops below step the engine themselves
    engine, model = runtime.engine, runtime.engine.model
    spec = FinetuneSpec(name="bench", data=_training_data(workdir), output_dir=workdir / "out",
                        lora=LoraSettings(rank=RANK, alpha=2 * RANK), batch_size=1,
                        max_length=64)
    trainer = Trainer(spec, model, runtime.tokenizer, "bench")
    example = trainer.train_examples[:1]
    prompts = [runtime.tokenizer(_CHAT.format(f"Write about {topic}.")).input_ids
               for topic in _TOPICS[:8]]

    def serve(stop: threading.Event) -> int:
        torch.set_num_threads(1)
        tokens = 0
        while not stop.is_set():
            if not engine.has_work:
                for i, prompt in enumerate(prompts):
                    engine.add(prompt, SamplingParams(max_tokens=32, ignore_eos=True),
                               (f"a{i}", adapters[i]))
            tokens += len(engine.step())
        return tokens

    def train(stop: threading.Event) -> int:
        torch.set_num_threads(1)
        lens = [len(e.token_ids) for e in example]
        ids = torch.tensor([t for e in example for t in e.token_ids])
        targets = shifted_targets(example, model.device)
        tokens = 0
        while not stop.is_set():
            batch = ForwardBatch(ids, lens, lora=LoraRouting.from_sequences(lens, [trainer.lora]))
            F.cross_entropy(model.logits(model(batch)), targets, ignore_index=-100).backward()
            tokens += sum(lens)
        return tokens

    def run(loops: list[Loop]) -> dict[str, float]:
        stop, counted = threading.Event(), {}
        threads = [threading.Thread(target=lambda f=f: counted.__setitem__(f.__name__, f(stop)))
                   for f in loops]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        return {name: tokens / wall for name, tokens in counted.items()}

    run([serve])  # warm up: adapters read, caches filled
    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for label, loops in (("alone", [serve]), ("alone", [train]), ("together", [serve, train])):
            for name, rate in run(loops).items():
                rounds.setdefault(f"{name} {label}", []).append(rate)
    medians = {key: statistics.median(values) for key, values in rounds.items()}
    for key, values in rounds.items():
        print(f"{key:>16}: {', '.join(f'{v:.1f}' for v in values)} tokens/s, "
              f"median {medians[key]:.1f}")
    for name in ("serve", "train"):
        ratio = medians[f"{name} together"] / medians[f"{name} alone"]
        print(f"{name} together / alone: {ratio:.2f}x")


if __name__ == "__main__":
    main()
