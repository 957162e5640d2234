"""The rows of one forward pass in groups that go through each layer apart: the served rows,
which keep no autograd state, and the training rows. A projection still reads its weights
once for every group (`shared_linear`: one GEMM over all their rows); everything else runs
per group, under the group's grad mode (`apart`).

Reading the weights is most of what a pass over a few rows costs on any device: a pass of its
own for the training rows would pay it twice in a step that also serves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cotune.model.quantized import Weight, dense, linear

if TYPE_CHECKING:
    from cotune.model.llama import ForwardBatch


@dataclass
class RowGroup:
    """Rows of a pass that go through the layers alike: `batch` (their routing, attention and
    cache), their rotary `cos` and `sin`, and whether their ops keep autograd state."""

    batch: ForwardBatch
    cos: torch.Tensor
    sin: torch.Tensor
    grad: bool
    seconds: float = 0.0  # spent on these rows, their share of the shared GEMMs included


def apart(groups: list[RowGroup], fn: Callable, *columns: list) -> list:
    """[fn(*that group's entries of `columns`) for each group], each under its group's grad
    mode and timed to it. A lone group runs as it is."""
    if len(groups) == 1:
        return [fn(*(column[0] for column in columns))]
    out = []
    for group, args in zip(groups, zip(*columns)):
        started = time.perf_counter()
        with torch.set_grad_enabled(group.grad):
            out.append(fn(*args))
        group.seconds += time.perf_counter() - started
    return out


def shared_linear(xs: list[torch.Tensor], groups: list[RowGroup], weight: Weight,
                  bias: torch.Tensor | None) -> list[torch.Tensor]:
    """[F.linear(x, weight, bias) for x in xs] as one GEMM over every group's rows; each
    output is differentiable with respect to its own input where that requires grad."""
    if len(xs) == 1:
        return [linear(xs[0], weight, bias)]
    started = time.perf_counter()
    ys = _SharedGemm.apply(weight, bias, *xs)
    seconds, rows = time.perf_counter() - started, sum(len(x) for x in xs)
    for group, x in zip(groups, xs):
        group.seconds += seconds * len(x) / max(1, rows)
    return list(ys)


class _SharedGemm(torch.autograd.Function):
    """y_g = x_g @ W.T + b for every group g, as one GEMM; W and b are frozen.

    Backward: dx_g = dy_g @ W for the inputs that require grad, nothing else (the other
    groups' rows cost no backward work, and nothing of theirs is saved). An output whose
    input needs no gradient is a view of the GEMM's result (served LoRA adds into it in
    place); the others are copies, so that such in-place adds never touch what autograd
    tracks."""

    @staticmethod
    def forward(ctx, weight, bias, *xs):
        y = linear(torch.cat(xs), weight, bias)
        if isinstance(weight, torch.Tensor):
            ctx.save_for_backward(weight)
        else:  # quantized: read back in float by backward (no tensor to save)
            ctx.quantized = weight
        needs = ctx.needs_input_grad[2:]
        outs = [part.clone() if need else part
                for part, need in zip(y.split([len(x) for x in xs]), needs)]
        ctx.mark_non_differentiable(*(part for part, need in zip(outs, needs) if not need))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        weight = ctx.saved_tensors[0] if ctx.saved_tensors else dense(ctx.quantized)
        needs = ctx.needs_input_grad[2:]
        return None, None, *(grad @ weight if need and grad is not None else None
                             for grad, need in zip(grads, needs))
