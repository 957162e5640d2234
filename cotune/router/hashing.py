"""Rendezvous (highest random weight) hashing: every worker gets a score for a key, and the
key's workers in order are the workers by descending score. Removing a worker moves only the
keys it was first for, and each of them to its own second choice, so an adapter stays hot
where it was on every other worker."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

W = TypeVar("W")


def score(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{worker_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, workers: Sequence[W], worker_id: Callable[[W], str]) -> list[W]:
    """`workers` in the order `key` prefers them."""
    return sorted(workers, key=lambda w: (score(key, worker_id(w)), worker_id(w)), reverse=True)


def first_unloaded(order: Sequence[W], load: Callable[[W], int], threshold: int) -> W:
    """The first of `order` with fewer than `threshold` calls in flight (spill past a loaded
    worker to the next one the key prefers); when every worker is loaded, the least loaded, in
    `order` among equals."""
    for worker in order:
        if load(worker) < threshold:
            return worker
    return min(order, key=load)
