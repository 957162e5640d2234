"""A cotune runtime on one way of storing the base (float32, bfloat16, `--quantize int8|int4`)
in its own process, for `cotune bench serving`: each has its own peak RSS, and the parent
runs the same requests on each in turn.

The worker is this module run as `python -m cotune.bench.base_process` from a temporary
directory (the checkout root never stands in for the installed package), speaking JSON lines:
  {"quantize", "dtype", "num_slots", "adapters"} -> {"load_s", "loaded_rss_mb",
                                                      "projections_mb"}
  {"prompts", "adapters", "new_tokens"}          -> {"tokens"}
  {"peak"}                                       -> {"peak_rss_mb"}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from cotune.bench.json_worker import JsonWorker
from cotune.engine.runtime import Request, Runtime
from cotune.model.quantized import QuantizedRows


class BaseProcess:
    """One worker holding the default model stored as `quantize` / `dtype`, with `adapters`."""

    def __init__(self, quantize: str | None, dtype: str, adapters: list[Path], num_slots: int):
        self.name = f"cotune-{quantize or dtype}"
        self._worker = JsonWorker([sys.executable, "-m", "cotune.bench.base_process"],
                                  f"{self.name} worker", cwd=tempfile.gettempdir())
        self.loaded = self._worker.ask({"quantize": quantize, "dtype": dtype,
                                        "num_slots": num_slots,
                                        "adapters": [str(a) for a in adapters]})

    def generate(self, prompts: list[list[int]], adapters: list[int | None],
                 new_tokens: int) -> int:
        """Generates exactly `new_tokens` greedy tokens a prompt; returns the tokens."""
        return self._worker.ask({"prompts": prompts, "adapters": adapters,
                                 "new_tokens": new_tokens})["tokens"]

    def peak(self) -> dict:
        """{"peak_rss_mb"}: the most resident memory the process ever held."""
        return self._worker.ask({"peak": True})

    def close(self) -> None:
        self._worker.close()


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """The high-water mark of this process image's resident memory (VmHWM: getrusage's
    ru_maxrss would keep the parent's from before the fork)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:"))
               .split()[1]) / 1024


def _projections_mb(runtime) -> float:
    """Bytes of the decoder projections' weights as stored (a shared quantized store once)."""
    stores = {}
    for module in runtime.engine.model.lora_modules().values():
        store = module.weight.store if isinstance(module.weight, QuantizedRows) else module.weight
        stores[id(store)] = store.nbytes
    return sum(stores.values()) / 2**20


def _serve() -> None:
    setup = json.loads(sys.stdin.readline())
    started = time.perf_counter()
    runtime = Runtime.load("default", dtype=setup["dtype"], quantize=setup["quantize"],
                           num_slots=setup["num_slots"])
    adapters = setup["adapters"]
    print(json.dumps({"load_s": time.perf_counter() - started, "loaded_rss_mb": _rss_mb(),
                      "projections_mb": _projections_mb(runtime)}), flush=True)
    for line in sys.stdin:
        message = json.loads(line)
        if "peak" in message:
            print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)
            continue
        requests = [Request(prompt_token_ids=p, max_tokens=message["new_tokens"],
                            ignore_eos=True, adapter=None if a is None else adapters[a])
                    for p, a in zip(message["prompts"], message["adapters"])]
        tokens = sum(c.completion_tokens for c in runtime.generate(requests))
        print(json.dumps({"tokens": tokens}), flush=True)
    runtime.close()


if __name__ == "__main__":
    _serve()
