"""The device's measured peaks, a clock for one call, and the roofline of the segmented LoRA
ops: the bytes each must move and the FLOPs it must compute, and the least time that takes.

Roofline time = max(bytes / measured memory bandwidth, FLOPs / measured matmul throughput).
The peaks are measured here rather than taken from a data sheet: a large device-to-device
copy (bytes read + written) and a large matmul in the benchmark's dtype (2*M*N*K FLOPs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

OPS = ("shrink", "expand", "weight_grad_a", "weight_grad_b")


@dataclass(frozen=True)
class Peaks:
    bytes_per_s: float  # device memory: a copy of copy_bytes, read + written
    flops_per_s: float  # a (matmul_size)^3 matmul in the benchmark's dtype
    copy_bytes: int
    matmul_size: int

    def time(self, nbytes: int, flops: int) -> float:
        """The roofline time (s) of moving `nbytes` and computing `flops`."""
        return max(nbytes / self.bytes_per_s, flops / self.flops_per_s)

    def as_dict(self) -> dict:
        return asdict(self)


class Clock:
    """The median time of a call over `repeats` calls, after `warmup` untimed ones.

    On a GPU: CUDA events around each call, with the L2 cache flushed before it (by writing a
    buffer larger than L2), so that adapter weights are read from device memory as in a real
    step, not from the cache the previous repeat filled. On the CPU: time.perf_counter."""

    def __init__(self, device: torch.device, warmup: int, repeats: int,
                 flush_bytes: int = 256 << 20):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.on_cuda = device.type == "cuda"
        self.flush = torch.empty(flush_bytes, dtype=torch.int8, device=device) \
            if self.on_cuda else None

    @property
    def name(self) -> str:
        return "cuda events, L2 flushed" if self.on_cuda else "time.perf_counter"

    def median(self, fn: Callable[[], object]) -> float:
        """Median seconds of one call of `fn`."""
        for _ in range(self.warmup):
            fn()
        if not self.on_cuda:
            return statistics.median(self._cpu_once(fn) for _ in range(self.repeats))
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3

    @staticmethod
    def _cpu_once(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def measure_peaks(clock: Clock, dtype: torch.dtype, copy_bytes: int, matmul_size: int) -> Peaks:
    """Memory bandwidth from a device-to-device copy and matmul throughput in `dtype`."""
    return Peaks(bytes_per_s=copy_bandwidth(clock, copy_bytes),
                 flops_per_s=matmul_throughput(clock, dtype, matmul_size),
                 copy_bytes=copy_bytes, matmul_size=matmul_size)


def copy_bandwidth(clock: Clock, nbytes: int) -> float:
    """Bytes per second of a copy of `nbytes`, counting the bytes read and those written."""
    src = torch.ones(nbytes, dtype=torch.int8, device=clock.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / clock.median(lambda: dst.copy_(src))


def matmul_throughput(clock: Clock, dtype: torch.dtype, size: int) -> float:
    """FLOPs per second (2 * size^3 a product) of a square matmul in `dtype`."""
    a = torch.randn(size, size, dtype=dtype, device=clock.device)
    b = torch.randn(size, size, dtype=dtype, device=clock.device)
    return 2 * size ** 3 / clock.median(lambda: torch.matmul(a, b))


def op_cost(op: str, rows: int, d_in: int, d_out: int, rank: int, adapters: int,
            itemsize: int) -> tuple[int, int]:
    """(bytes, FLOPs) that op `op` must at least move and compute on a layer d_in -> d_out:
    its inputs read once, the weights of each of the `adapters` distinct adapters read once,
    its output written once (in the dtype of `itemsize` bytes; weight gradients in float32).

      shrink         h = x @ A.T              read x (T, d_in), A (n, R, d_in); write h (T, R)
      expand         y += h @ B.T             read h, B (n, d_out, R); read and write y (T, d_out)
      weight_grad_a  dA = dh.T @ x per slot   read dh (T, R), x (T, d_in); write dA (n, R, d_in)
      weight_grad_b  dB = dy.T @ h per slot   read dy (T, d_out), h (T, R); write dB (n, d_out, R)
    """
    t, r, n, e = rows, rank, adapters, itemsize
    if op == "shrink":
        return (t * d_in + n * r * d_in + t * r) * e, 2 * t * r * d_in
    if op == "expand":
        return (t * r + n * d_out * r + 2 * t * d_out) * e, 2 * t * r * d_out
    if op == "weight_grad_a":
        return (t * r + t * d_in) * e + n * r * d_in * 4, 2 * t * r * d_in
    if op == "weight_grad_b":
        return (t * d_out + t * r) * e + n * d_out * r * 4, 2 * t * r * d_out
    raise ValueError(f"unknown op {op!r}; accepted: {', '.join(OPS)}")
