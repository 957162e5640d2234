"""What the Triton kernels' host wrappers check before a launch: a kernel reads raw addresses
through the strides it is given, so tensors of the wrong shape, dtype or device would be read
as garbage rather than refused. Each check raises ValueError saying what was given and what
is accepted."""

from __future__ import annotations

import torch

from cotune.kernels.lora_batch import LoraBatch


def check_shrink(x: torch.Tensor, weights: list[torch.Tensor], batch: LoraBatch,
                 scales: list[torch.Tensor | None]) -> None:
    """x (T, d_in); each pool (N, R, d_in) of one shape; scales (N,) or None."""
    _matrix("x", x)
    first = weights[0]
    for j, w in enumerate(weights):
        _same(f"pool {j}", w, x)
        if w.dim() != 3 or w.shape != first.shape or w.shape[2] != x.shape[1]:
            raise ValueError(f"shrink pool {j} has shape {tuple(w.shape)}; accepted: (N, R, "
                             f"{x.shape[1]}) like pool 0 {tuple(first.shape)}, d_in of x")
    _check_scales(scales, first.shape[0], x.device)
    _check_batch(batch, x.shape[0], first.shape[0])


def check_expand(y: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor],
                 offsets: list[int], batch: LoraBatch,
                 scales: list[torch.Tensor | None]) -> None:
    """y (T, >= offset_j + d_j); h (T, J*R); each pool (N, d_j, R); scales (N,) float32."""
    _matrix("y", y)
    _matrix("h", h)
    _same("h", h, y)
    rank = weights[0].shape[2]
    if h.shape[0] != y.shape[0] or h.shape[1] != rank * len(weights):
        raise ValueError(f"expand h has shape {tuple(h.shape)}; accepted: ({y.shape[0]}, "
                         f"{rank * len(weights)}), y's rows and R of each of {len(weights)} "
                         "pools")
    for j, (w, offset) in enumerate(zip(weights, offsets)):
        _same(f"pool {j}", w, y)
        if w.dim() != 3 or w.shape[0] != weights[0].shape[0] or w.shape[2] != rank:
            raise ValueError(f"expand pool {j} has shape {tuple(w.shape)}; accepted: "
                             f"({weights[0].shape[0]}, d_out, {rank}) like pool 0")
        if not 0 <= offset <= y.shape[1] - w.shape[1]:
            raise ValueError(f"expand pool {j} writes columns {offset}..{offset + w.shape[1]} "
                             f"of y, which has {y.shape[1]}")
    _check_scales(scales, weights[0].shape[0], y.device)
    _check_batch(batch, y.shape[0], weights[0].shape[0])


def check_weight_grad(grad_out: torch.Tensor, inputs: torch.Tensor, batch: LoraBatch,
                      num_slots: int, scales: torch.Tensor | None) -> None:
    """grad_out (T, d_out) and inputs (T, d_in) of one dtype and device; scales (N,)."""
    _matrix("grad_out", grad_out)
    _matrix("inputs", inputs)
    _same("inputs", inputs, grad_out)
    if inputs.shape[0] != grad_out.shape[0]:
        raise ValueError(f"weight_grad takes grad_out and inputs of the same rows; got "
                         f"{grad_out.shape[0]} and {inputs.shape[0]}")
    _check_scales([scales], num_slots, inputs.device)
    _check_batch(batch, inputs.shape[0], num_slots)


def _matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: a matrix (rows, d)")


def _same(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; accepted: {like.dtype} on "
                         f"{like.device}, as the rows are")


def _check_scales(scales, num_slots: int, device) -> None:
    for s in scales:
        if s is None:
            continue
        if s.shape != (num_slots,) or s.dtype not in (torch.float32, torch.float64) \
                or s.device != device or s.stride(0) != 1:
            raise ValueError(f"scales are {tuple(s.shape)} {s.dtype} on {s.device} (stride "
                             f"{s.stride()}); accepted: ({num_slots},) contiguous float32 (or "
                             f"float64) on {device}, one per slot")


def _check_batch(batch: LoraBatch, num_rows: int, num_slots: int) -> None:
    if batch.rows > num_rows:
        raise ValueError(f"{batch} covers rows up to {batch.rows}, but the tensors have "
                         f"{num_rows}")
    if batch.top_slot >= num_slots:
        raise ValueError(f"{batch} uses slot {batch.top_slot}, but the pools have "
                         f"{num_slots} slots")
