"""A real `cotune serve` in a subprocess on 127.0.0.1, for the benchmarks that measure what a
client of the server sees."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 300
LISTENING = re.compile(r"listening on ([\w.]+):(\d+)")
OPENAI_API = re.compile(r"^openai api: (\S+)")


@dataclass
class ServerProcess:
    address: str
    admin_token: str
    proc: subprocess.Popen
    output: list[str] = field(default_factory=list)  # every line it printed so far

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> float:
        """Sends `sig` and waits for the exit; returns the seconds it took (killed past
        `timeout`)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return time.monotonic() - started

    def openai_url(self, timeout: float = 30) -> str:
        """The base URL of the OpenAI-compatible front (`--http-port`), as the banner says."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output:
                if match := OPENAI_API.match(line):
                    return match[1]
            time.sleep(0.05)
        raise RuntimeError("the server printed no 'openai api:' line; was it started with "
                           "--http-port?")


def start_server(data_dir: Path, *args: str, env: dict | None = None) -> ServerProcess:
    """Starts `cotune serve --port 0 --data-dir data_dir *args` and waits until it listens."""
    command = [sys.executable, "-m", "cotune.cli", "serve", "--port", "0",
               "--data-dir", str(data_dir), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    output: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                address.append(f"{match[1]}:{match[2]}")
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("cotune serve did not start:\n" + "".join(output[-50:]))
    preset = args[args.index("--admin-token-file") + 1] if "--admin-token-file" in args \
        else data_dir / "admin.token"
    return ServerProcess(address[0], Path(preset).read_text().strip(), proc, output)
