"""`cotune bench coserve`: serving SLOs and training speed when both share the base.

Requests arrive as a Poisson process over several adapters while one fine-tuning job runs.
For each arrival rate, three ways of sharing one process and one base are measured:
  coserve      cotune: serving and training in the same steps, sized by the SLOs
  time-slice   serve for `slice_s`, then train for `slice_s`, alternately (the baseline)
and, once, the job alone (its solo training speed). Reported: SLO attainment (TTFT and
TPOT both met, over all requests that arrived) and training tokens per second.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path

from cotune.bench.serving import machine, make_adapters
from cotune.engine.finetune_spec import FinetuneSpec, LoraSettings
from cotune.engine.runtime import Request, Runtime

_SENTENCES = ["The river runs past the old mill and into the valley.",
              "Every morning the baker opens the shop before sunrise.",
              "A good map shows the roads, the rivers and the hills.",
              "The library keeps its oldest books in a cool dry room."]


def _training_data(directory: Path) -> Path:
    path = directory / "train.jsonl"
    lines = [json.dumps({"text": f"{s} Note {i}."}) for i in range(64) for s in _SENTENCES]
    path.write_text("\n".join(lines) + "\n")
    return path


def _spec(directory: Path, name: str) -> FinetuneSpec:
    return FinetuneSpec(name=name, data=str(_training_data(directory)),
                        output_dir=str(directory / "out"), lora=LoraSettings(rank=16, alpha=32),
                        batch_size=4, epochs=100, max_length=64)


def _arrivals(rate: float, duration: float, seed: int) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return times
        times.append(t)


def _serve(runtime: Runtime, arrivals: list[float], adapters: list[Path],
           new_tokens: int) -> list:
    """Submits each request at its arrival time; returns its completion."""
    results, threads, started = [None] * len(arrivals), [], time.monotonic()

    def one(i: int) -> None:
        request = Request(prompt=f"Question {i}: what is a river?", max_tokens=new_tokens,
                          ignore_eos=True, adapter=str(adapters[i % len(adapters)]))
        results[i] = runtime.generate([request])[0]

    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, started + at - time.monotonic()))
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return results


def _time_slicer(runtime: Runtime, slice_s: float, stop: threading.Event) -> None:
    """Alternates: serve only, then train only, each for slice_s."""
    engine = runtime.engine
    serving = True
    while not stop.wait(slice_s):
        serving = not serving
        engine.serving_paused, engine.training_paused = not serving, serving
    engine.serving_paused = engine.training_paused = False


def _measure(runtime: Runtime, directory: Path, name: str, rate: float | None,
             duration: float, adapters, new_tokens, slice_s: float | None) -> dict:
    job = runtime.finetune(_spec(directory, name))
    counters = runtime.engine.scheduler.counters
    before = dict(counters)
    tokens_before, started = job.trainer.tokens, time.monotonic()
    stop = threading.Event()
    slicer = None
    if slice_s is not None:
        slicer = threading.Thread(target=_time_slicer, args=(runtime, slice_s, stop))
        slicer.start()
    if rate is None:
        time.sleep(duration)
        requests = []
    else:
        requests = _serve(runtime, _arrivals(rate, duration, seed=int(rate * 1000)), adapters,
                          new_tokens)
    elapsed = time.monotonic() - started
    trained = job.trainer.tokens - tokens_before
    stop.set()
    if slicer is not None:
        slicer.join()
    job.cancel()
    job.wait(timeout=600)  # it stops at the next step boundary
    met = counters["slo_both_met"] - before.get("slo_both_met", 0)
    return {"requests": len(requests), "slo_attainment": met / len(requests) if requests
            else None, "training_tokens_per_s": trained / elapsed}


def run(rates: list[float], duration: float, num_adapters: int, new_tokens: int,
        slice_s: float, out_dir: Path) -> dict:
    runtime = Runtime.load("default", num_slots=num_adapters + 4)
    directory = Path(tempfile.mkdtemp(prefix="cotune-coserve-"))
    adapters = make_adapters(runtime, num_adapters, directory)
    config = runtime.engine.config
    solo = _measure(runtime, directory, "solo", None, duration, adapters, new_tokens, None)
    rows = []
    for rate in rates:
        for mode, slicing in (("coserve", None), ("time-slice", slice_s)):
            result = _measure(runtime, directory, f"{mode}-{rate}".replace(".", "_"), rate,
                              duration, adapters, new_tokens, slicing)
            result.update(mode=mode, rate=rate, training_vs_solo=(
                result["training_tokens_per_s"] / solo["training_tokens_per_s"]))
            rows.append(result)
    runtime.close()
    result = {"benchmark": "coserve", "machine": machine(), "model": "SmolLM2-135M-Instruct",
              "duration_s": duration, "adapters": num_adapters, "new_tokens": new_tokens,
              "ttft_target_s": config.ttft_target_s, "tpot_target_s": config.tpot_target_s,
              "slice_s": slice_s, "solo_training_tokens_per_s": solo["training_tokens_per_s"],
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "coserve.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Co-serving: Poisson arrivals over {num_adapters} adapters plus one fine-tune",
             "", f"Machine: {result['machine']}. SLOs: TTFT <= {config.ttft_target_s} s, "
             f"TPOT <= {config.tpot_target_s} s; {new_tokens} new tokens per request; "
             f"{duration:.0f} s per point; time slices of {slice_s} s.", "",
             f"Training alone: {solo['training_tokens_per_s']:.1f} tokens/s.", "",
             "| rate (req/s) | mode | requests | SLO attainment | training tokens/s | vs alone |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['rate']} | {row['mode']} | {row['requests']} | "
                     f"{row['slo_attainment']:.0%} | {row['training_tokens_per_s']:.1f} | "
                     f"{row['training_vs_solo']:.0%} |")
    (out_dir / "coserve.md").write_text("\n".join(lines) + "\n")
    return result
