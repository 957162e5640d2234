"""A real `cotune serve` in a subprocess on 127.0.0.1, on a tiny random model, for the tests
of the server, the SDK and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import make_peft_adapter, tiny_hf_model, tiny_tokenizer

from cotune.bench.server_process import ServerProcess
from cotune.bench.server_process import start_server as start_process

# Eight prompt/completion lines of JSONL: the training data of the tests' jobs.
TRAINING_DATA = "\n".join(json.dumps({"prompt": f"the cat {i}", "completion": " sat on the mat"})
                          for i in range(8)).encode()


def tiny_model_dir(root: Path) -> Path:
    """A tiny Llama checkpoint with its tokenizer under `root` (made once per root)."""
    path = root / "tiny-model"
    if not (path / "config.json").is_file():
        model = tiny_hf_model("llama2")
        model.generation_config.eos_token_id = None
        model.save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def tiny_adapter_dir(path: Path, seed: int = 0, r: int = 4,
                     targets: tuple[str, ...] = ("q_proj", "v_proj"), dora: bool = False) -> Path:
    """A real PEFT adapter for the tiny model of `tiny_model_dir` (DoRA with `dora`)."""
    make_peft_adapter(tiny_hf_model("llama2"), path, r=r, alpha=2 * r, targets=list(targets),
                      seed=seed, dora=dora)
    return path


@dataclass
class RunningServer:
    address: str
    admin_token: str
    data_dir: Path
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)  # every line it printed so far

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self._process().stop(sig, timeout)
        return self.proc.returncode

    def openai_url(self) -> str:
        """The base URL of the OpenAI-compatible front, for a server started with --http-port."""
        return self._process().openai_url()

    def _process(self) -> ServerProcess:
        return ServerProcess(self.address, self.admin_token, self.proc, self.output)


def start_server(root: Path, *extra_args: str, data_dir: Path | None = None,
                 env: dict | None = None) -> RunningServer:
    """Starts `cotune serve` on the tiny model on a free port and waits until it listens."""
    data_dir = data_dir or root / "data"
    server = start_process(data_dir, "--model", str(tiny_model_dir(root)), "--max-rank", "16",
                           "--num-slots", "8", "--kv-cache-tokens", "4096", "--grace-period",
                           "5", *extra_args, env=env)
    return RunningServer(server.address, server.admin_token, data_dir, server.proc,
                         server.output)


@contextmanager
def running_server(root: Path, *extra_args: str, **options):
    server = start_server(root, *extra_args, **options)
    try:
        yield server
    finally:
        server.stop()
