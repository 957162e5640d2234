"""What a failure of one adapter or one request costs: those requests, and that adapter,
never the engine.

An adapter can pass every check and still turn its rows' outputs into overflow, and a step's
forward can fail on one adapter's slot. The engine then fails the rows it can trace the fault
to, quarantines their adapter (it refuses further requests, saying why) and goes on serving
everyone else (`Engine._contain`). Non-finite logits for a row are such a fault.
"""

from __future__ import annotations

import torch


class RequestFailed(RuntimeError):
    """The engine failed this request alone (its rows' outputs, or a pass over them, failed);
    the message says why. Other requests go on."""


class AdapterQuarantined(RuntimeError):
    """The adapter failed a step and was taken out of service on this server; the message
    says why and what to do."""


class Quarantine:
    """The adapters taken out of service, by engine key, each with its reason. Written by the
    engine thread, read by any thread (single dict operations)."""

    def __init__(self):
        self._reasons: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._reasons

    def add(self, key: str, reason: str) -> AdapterQuarantined:
        """Takes the adapter out of service; returns the error its requests end with."""
        self._reasons[key] = reason
        return self.error(key)

    def check(self, key: str) -> None:
        """Refuses a request for a quarantined adapter."""
        if key in self._reasons:
            raise self.error(key)

    def error(self, key: str) -> AdapterQuarantined:
        return AdapterQuarantined(
            f"adapter {key!r} is quarantined on this server: {self._reasons[key]}; its "
            "requests are refused: serve a new version with finite, moderate weights and "
            "lora_alpha")


def non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of `logits` (rows, vocab) with a NaN or an infinity."""
    finite = torch.isfinite(logits).all(dim=-1)
    if bool(finite.all()):
        return []
    return (~finite).nonzero().flatten().tolist()
