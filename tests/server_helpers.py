"""A real `cotune serve` in a subprocess on 127.0.0.1, on a tiny random model, for the tests
of the server, the SDK and the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import make_peft_adapter, tiny_hf_model, tiny_tokenizer

START_TIMEOUT_S = 180
_LISTENING = re.compile(r"listening on ([\w.]+):(\d+)")


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
                     targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A real PEFT adapter for the tiny model of `tiny_model_dir`."""
    make_peft_adapter(tiny_hf_model("llama2"), path, r=r, alpha=2 * r, targets=list(targets),
                      seed=seed)
    return path


@dataclass
class RunningServer:
    address: str
    admin_token: str
    data_dir: Path
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)  # every line it printed so far

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(root: Path, *extra_args: str, data_dir: Path | None = None,
                 env: dict | None = None) -> RunningServer:
    """Starts `cotune serve` on a free port and waits until it listens."""
    data_dir = data_dir or root / "data"
    command = [sys.executable, "-m", "cotune.cli", "serve", "--model", str(tiny_model_dir(root)),
               "--port", "0", "--data-dir", str(data_dir), "--max-rank", "16",
               "--num-slots", "8", "--kv-cache-tokens", "4096", "--grace-period", "5",
               *extra_args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    output: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            match = _LISTENING.search(line)
            if match and not found.is_set():
                address.append(f"{match[1]}:{match[2]}")
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("cotune serve did not start:\n" + "".join(output[-50:]))
    preset = extra_args[extra_args.index("--admin-token-file") + 1] \
        if "--admin-token-file" in extra_args else data_dir / "admin.token"
    token = Path(preset).read_text().strip()
    return RunningServer(address[0], token, data_dir, proc, output)


@contextmanager
def running_server(root: Path, *extra_args: str, **options):
    server = start_server(root, *extra_args, **options)
    try:
        yield server
    finally:
        server.stop()
