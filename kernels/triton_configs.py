"""Block sizes of the Triton kernels: the candidates Triton's autotuner measures on a GPU, per
kernel and shape, and the one fallback that is valid everywhere.

On a CUDA device each kernel is wrapped in `triton.autotune` over its candidates: the first
launch for a new key (layer width, rank, bucket of rows) times every candidate on that device
and keeps the fastest for the rest of the process. In Triton's interpreter (the CPU) only the
fallback is used: the interpreter cannot time several configs.
"""

from __future__ import annotations

import os

import triton

# Valid for every shape and device (tl.dot needs blocks of at least 16), and the only config
# in the interpreter, whose cost is per operation whatever the block: larger blocks keep the
# model tests fast there, and the kernel tests choose sizes that still take several blocks.
FALLBACK = {
    "shrink": dict(BLOCK_M=32, BLOCK_K=128, BLOCK_R=32),
    "expand": dict(BLOCK_M=32, BLOCK_R=32, BLOCK_N=128),
    "weight_grad": dict(BLOCK_M=32, BLOCK_O=64, BLOCK_I=128),
    "shrink_rows": dict(BLOCK_M=16, BLOCK_K=128, BLOCK_R=32),
    "expand_rows": dict(BLOCK_M=16, BLOCK_R=32, BLOCK_N=128),
}

# What each kernel's autotuner may choose from on a GPU (the fallback among them).
_CANDIDATES = {
    "shrink": [dict(BLOCK_M=m, BLOCK_K=k, BLOCK_R=r)
               for m in (16, 64) for k in (64, 256) for r in (16, 64)],
    "expand": [dict(BLOCK_M=m, BLOCK_R=r, BLOCK_N=n)
               for m in (16, 64) for r in (16, 64) for n in (64, 256)],
    "weight_grad": [dict(BLOCK_M=m, BLOCK_O=o, BLOCK_I=i)
                    for m in (32, 128) for o in (32, 64) for i in (64, 128)],
    "shrink_rows": [dict(BLOCK_M=m, BLOCK_K=k, BLOCK_R=16) for m in (1, 4, 16) for k in (64, 256)],
    "expand_rows": [dict(BLOCK_M=m, BLOCK_R=16, BLOCK_N=n) for m in (1, 4, 16) for n in (64, 256)],
}

# Keys of a launch that make the autotuner measure again: the shape of the work.
_KEYS = {
    "shrink": ["d_in", "rank", "rows_bucket"],
    "expand": ["d_out", "rank", "rows_bucket"],
    "weight_grad": ["d_out", "d_in", "rows_bucket"],
    "shrink_rows": ["d_in", "rank", "rows_bucket"],
    "expand_rows": ["d_out", "rank", "rows_bucket"],
}

# A batch whose adapter segments are all this short or shorter (decode: one row per sequence,
# a few sequences per adapter) runs the per-row kernels instead of the segment kernels.
DECODE_MAX_ROWS = 8


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tuned(kernel: str, jitted, restore: tuple[str, ...] = ()):
    """`jitted` wrapped in Triton's autotuner over the candidates for `kernel` (the fallback
    alone in the interpreter). `restore` names the arguments the kernel adds into in place,
    restored after each timed candidate."""
    choices = [FALLBACK[kernel]] if interpreted() else _CANDIDATES[kernel] + [FALLBACK[kernel]]
    configs = [triton.Config(dict(c), num_warps=4) for c in _unique(choices)]
    return triton.autotune(configs, key=_KEYS[kernel], restore_value=list(restore))(jitted)


def rows_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: batches of similar size share a measurement."""
    return 1 << max(rows - 1, 0).bit_length()


def _unique(choices: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in choices:
        if tuple(sorted(c.items())) not in seen:
            seen.add(tuple(sorted(c.items())))
            out.append(c)
    return out
