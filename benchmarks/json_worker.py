"""A child process spoken to in JSON lines: one message on its stdin, one answer on its stdout.
Its stderr goes to a temporary file, whose tail the error says when the child dies."""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import NoReturn


class JsonWorker:
    def __init__(self, command: list[str], name: str, failure: type[Exception] = RuntimeError,
                 **popen):
        self.name, self._failure = name, failure
        self._log = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, text=True, **popen)

    def ask(self, message: dict) -> dict:
        """Sends `message` and returns the answer; `failure` with the child's last output when
        it exited instead."""
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self._fail()
        return json.loads(line)

    def close(self) -> None:
        """Closes its stdin (the child's signal to exit) and waits a minute before killing it."""
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def _fail(self) -> NoReturn:
        self._process.kill()
        self._process.wait()
        self._log.seek(0)
        tail = self._log.read()[-4000:]
        raise self._failure(f"the {self.name} exited (status {self._process.returncode}); its "
                            f"last output:\n{tail}")
