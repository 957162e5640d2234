"""The engine thread's inbox: what other threads ask of the engine (new requests, aborts, jobs
started or cancelled, checkpoints) waits here, and takes effect between two steps.

Any thread may `put` at any time and returns at once: no caller ever waits for a step. Only
the engine thread calls `apply` and `wait`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class Inbox:
    def __init__(self):
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._ready = threading.Event()

    def put(self, command: Callable[[], None]) -> None:
        """Asks the engine thread to run `command` at the next step boundary (in order)."""
        self._commands.put(command)
        self._ready.set()

    def wake(self) -> None:
        """Ends a `wait` without a command (the caller changed a flag the loop reads)."""
        self._ready.set()

    def apply(self) -> None:
        """Runs every command that has arrived, in order (engine thread, between steps)."""
        self._ready.clear()  # before draining: a command put meanwhile sets it again
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks the idle engine thread until something arrives, or `timeout` passes."""
        self._ready.wait(timeout)
