"""How the `cotune` client commands print: aligned tables for people, JSON for scripts, and
the live progress line of a watched job."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime, timedelta


def to_jsonable(value):
    """SDK results (dataclasses, datetimes, tuples) as plain JSON values."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_json(value) -> None:
    """One JSON document on one line, flushed: a stream of them is JSON Lines."""
    print(json.dumps(to_jsonable(value)), flush=True)


def print_table(headers: list[str], rows: list[list]) -> None:
    """Left-aligned columns under upper-case headers; None prints as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    for row in [[h.upper() for h in headers], *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def print_fields(value, exclude: tuple[str, ...] = ()) -> None:
    """A dataclass as 'name: value' lines (nested ones as one 'key=value, ...' list)."""
    for f in dataclasses.fields(value):
        if f.name not in exclude:
            print(f"{f.name}: {_cell(getattr(value, f.name))}")


def when(value: datetime | None) -> str | None:
    """A UTC time to the second, as tables show it."""
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, float):  # wire Structs carry integers as floats: 12, not 12.0
        return str(int(value)) if value.is_integer() else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) or "-"
    if dataclasses.is_dataclass(value):  # the fields that are set, such as quotas
        return _cell({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                      if getattr(value, f.name) is not None})
    return str(value)


class ProgressLine:
    """The training progress of a watched job on stderr: redrawn in place with \\r on a
    terminal, one line per update otherwise (logs, pipes)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._shown = 0  # characters of the line now drawn (terminal only)
        self._first: tuple[float, int] | None = None  # (time, step) of the first update

    def update(self, step: int, total: int, loss: float, tokens_per_second: float) -> None:
        now = time.monotonic()
        if self._first is None or step < self._first[1]:
            self._first = (now, step)
        text = (f"step {step}/{total}  loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  "
                f"ETA {self._eta(now, step, total)}")
        if self.live:
            self.stream.write("\r" + text.ljust(self._shown))
            self._shown = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Ends the live line, so that other output starts on a line of its own."""
        if self.live and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0

    def _eta(self, now: float, step: int, total: int) -> str:
        start, first_step = self._first
        if step <= first_step or total <= step:
            return "-"
        seconds = (now - start) / (step - first_step) * (total - step)
        return str(timedelta(seconds=round(seconds)))
