"""Driving an Engine to completion in tests."""

from __future__ import annotations

from cotune.engine.engine import Engine


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> int:
    """Steps until no work is left; returns the number of steps."""
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert steps < max_steps, "the engine did not finish"
    return steps


def steps_until(engine: Engine, condition, limit: int = 2000) -> None:
    """Steps until `condition()` holds, at most `limit` steps."""
    for _ in range(limit):
        if condition():
            return
        engine.step()
    raise AssertionError("condition never met")
