"""What grpc.health.v1 of `cotune serve` says once it has started: SERVING while its engine
can serve; NOT_SERVING once the engine stopped (closed, or failed on an error) and while it
is wedged, when no step has completed for --health-stall-seconds while work waits, SERVING
again once it steps.

The engine is judged from what its thread writes (its progress count, whether work waits,
its error), read on a thread of its own: a health check reads only the status set here, and
never waits for a step or takes a lock the engine's loop holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2

from cotune.server.lifecycle import Lifecycle

SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)
MAX_POLL_S = 1.0


class EngineHealth:
    """Called by one thread only: `update` every `poll_s` seconds, from the end of
    start-up (the model loaded, the jobs resumed) until the server stops."""

    def __init__(self, runtime, lifecycle: Lifecycle, stall_s: float, log: logging.Logger,
                 clock: Callable[[], float] = time.monotonic):
        self.runtime, self.lifecycle, self.stall_s, self.log = runtime, lifecycle, stall_s, log
        self.clock = clock
        self.poll_s = min(MAX_POLL_S, stall_s / 4)
        self._progress = runtime.engine.progress
        self._waiting = False
        self._since = clock()  # a stall is counted from here: the last step seen, or idle
        self._state: tuple[bool, BaseException | None] | None = None  # serving?, error

    def update(self) -> None:
        """Sets health to what the engine's state says now, logging each change (an engine
        that failed: with its error's traceback)."""
        error = self.runtime.error  # read once: what is logged is what was judged
        problem = self._problem(error)
        state = (problem is None, error)
        if state == self._state:
            return
        first, self._state = self._state is None, state
        if problem is None:
            self.lifecycle.set_health(SERVING)
            if not first:
                self.log.info("health is SERVING again: the engine steps")
        else:
            self.lifecycle.set_health(NOT_SERVING)
            self.log.error("health is NOT_SERVING: %s", problem, exc_info=error)

    def _problem(self, error: BaseException | None) -> str | None:
        """Why the engine cannot serve now, or None while it can."""
        if error is not None:
            return f"the engine stopped on an error: {error!r}"
        if not self.runtime.running:
            return "the engine is stopped"
        engine = self.runtime.engine
        now, progress, waiting = self.clock(), engine.progress, engine.has_work
        if progress != self._progress or not self._waiting:
            self._since = now  # work began waiting after the last look, or the engine stepped
        self._progress, self._waiting = progress, waiting
        stalled = now - self._since
        if waiting and stalled > self.stall_s:
            return (f"no engine step has completed for {stalled:.0f} s while work waits "
                    f"(--health-stall-seconds {self.stall_s:g}): the engine is wedged")
        return None
