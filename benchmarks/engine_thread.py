"""The Runtime's engine thread against stepping the same engine from the caller's thread.

    .venv/bin/python -m cotune.bench.engine_thread [--adapters 8] [--requests 32] [--rounds 3]

One process, one model, the same workload each time (greedy, every request to its
`max_tokens`), in interleaved rounds: `Runtime.generate` (the engine steps on its own
thread), `Engine.step` called in a loop by the main thread, and the same loop on a fresh
thread. Prints tokens per second per round and the ratios of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from cotune.bench.serving import make_adapters
from cotune.engine.runtime import Request, Runtime
from cotune.engine.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runtime = Runtime.load("default", num_slots=max(1, args.adapters))
    engine = runtime.engine
    adapters = make_adapters(runtime, args.adapters, Path(tempfile.mkdtemp()))
    prompts = [runtime.tokenizer(f"Tell me a story about the number {i}.").input_ids
               for i in range(args.requests)]

    def adapter(i: int) -> Path | None:
        return adapters[i % len(adapters)] if adapters else None

    def stepped() -> float:  # the engine loop without the Runtime, in the calling thread
        torch.set_num_threads(engine.config.torch_threads)  # as the Runtime's thread does
        params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
        seqs = [engine.add(p, params, None if adapter(i) is None else
                           (str(adapter(i)), adapter(i))) for i, p in enumerate(prompts)]
        started = time.perf_counter()
        while engine.has_work:
            engine.step()
        return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - started)

    def stepped_on_a_new_thread() -> float:
        result = []
        thread = threading.Thread(target=lambda: result.append(stepped()))
        thread.start()
        thread.join()
        return result[0]

    def runtime_thread() -> float:
        requests = [Request(prompt_token_ids=p, max_tokens=args.new_tokens, ignore_eos=True,
                            adapter=None if adapter(i) is None else str(adapter(i)))
                    for i, p in enumerate(prompts)]
        started = time.perf_counter()
        completions = runtime.generate(requests)
        return sum(len(c.token_ids) for c in completions) / (time.perf_counter() - started)

    systems = {"runtime thread": runtime_thread, "main thread": stepped,
               "new thread": stepped_on_a_new_thread}
    runtime_thread()  # warm up: adapters read, caches filled
    rounds = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, run in systems.items():
            rounds[name].append(run())
    runtime.close()
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    for name, values in rounds.items():
        print(f"{name:>15}: {', '.join(f'{v:.1f}' for v in values)} tokens/s, "
              f"median {medians[name]:.1f}")
    ratio = medians["runtime thread"] / medians["main thread"]
    print(f"runtime thread / main thread: {ratio:.2f}x")


if __name__ == "__main__":
    main()
