"""A base projection's weight stored in 8 or 4 bits (weight-only quantization, `--quantize`).

The base's decoder projections are stored quantized; the embedding, the norms, the biases and
every adapter stay in the model's dtype. The matmuls are PyTorch's own packed CPU kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`): no dependency beyond the pinned torch,
the same kernels torchao calls on the CPU. They are fast only with bfloat16 activations (the
float32 variants run scalar code, 25x slower than a float32 GEMM on this CPU), so:
  bfloat16 activations on the CPU   the packed kernel
  anything else                     x @ dequantize().T, exact in float32 (one projection's
                                    weights exist in float at a time)

Formats (per output row n, input column k):
  int8  w[n, k] = q[n, k] * scale[n]                        q in [-127, 127], absmax per row
  int4  w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]  q in [0, 15], g = k // 32, min-max
        per group of 32 inputs (GGUF's Q4_0 and Q4_1 blocks are of this form and load exactly)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch.nn import functional as F

from cotune.model.quantization import QuantizationError

INT4_GROUP = 32
# PyTorch's CPU int4 layout packs rows in blocks of 64 (rows r and r + 32 of a block share a
# byte, column by column); a weight is padded to whole blocks so that it can be read back.
_INT4_BLOCK_ROWS = 64


class QuantizedWeight(ABC):
    """A (out_features, in_features) weight in 8 or 4 bits, computing in `dtype`."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype):
        self.shape = torch.Size((out_features, in_features))
        self.dtype = dtype

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T: (T, in_features) -> (T, out_features), no autograd."""
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return self._packed_matmul(x)
        return F.linear(x, self.dequantize(x.dtype))

    @abstractmethod
    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight's values, (out_features, in_features) in `dtype` (default its own)."""

    def rows(self, start: int, stop: int) -> QuantizedRows:
        return QuantizedRows(self, start, stop)


class Int8Weight(QuantizedWeight):
    def __init__(self, values: torch.Tensor, scales: torch.Tensor):
        super().__init__(values.shape[0], values.shape[1], scales.dtype)
        self.values, self.scales = values, scales  # (N, K) int8, (N,) dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """Symmetric per-row quantization of a float weight (N, K)."""
        w = weight.float()
        scales = w.abs().amax(dim=1) / 127
        safe = torch.where(scales > 0, scales, 1.0)
        values = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(values.contiguous(), scales.to(dtype))

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.values, self.scales)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.values.float() * self.scales.float()[:, None]
        return w.to(dtype or self.dtype)


class Int4Weight(QuantizedWeight):
    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int):
        super().__init__(out_features, packed.shape[1] * 2, scales_and_zeros.dtype)
        # (N padded to blocks of 64, K / 2) uint8 in PyTorch's CPU layout; (K / 32, N padded,
        # 2): each group's scale and zero
        self.packed, self.scales_and_zeros = packed, scales_and_zeros

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
        """Asymmetric min-max quantization of a float weight (N, K) per group of 32 inputs."""
        out_features, in_features = weight.shape
        check_int4_width(in_features)
        groups = weight.float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, 1.0)
        levels = torch.round((groups - low[..., None]) / safe[..., None]).clamp(0, 15)
        return cls.from_levels(levels.reshape(out_features, in_features).to(torch.uint8),
                               scale, low, dtype)

    @classmethod
    def from_levels(cls, levels: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    dtype: torch.dtype) -> Int4Weight:
        """w = levels * scale + minimum per group of 32 inputs: levels (N, K) in [0, 15],
        scale and minimum (N, K / 32) (GGUF's Q4_1 blocks; Q4_0 has minimum = -8 scale)."""
        out_features, in_features = levels.shape
        check_int4_width(in_features)
        padded = -out_features % _INT4_BLOCK_ROWS
        ints = F.pad(levels.to(torch.int32), (0, 0, 0, padded))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(ints.contiguous(), 1)
        scale, minimum = (F.pad(t.float(), (0, 0, 0, padded)) for t in (scale, minimum))
        # the kernel's form: (q - 8) * scale + zero
        scales_and_zeros = torch.stack([scale.t(), (minimum + 8 * scale).t()], dim=-1)
        return cls(packed, scales_and_zeros.to(dtype).contiguous(), out_features)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP,
                                                        self.scales_and_zeros)
        # padded rows dropped (a copy: autograd refuses in-place adds to a custom op's view)
        return y if y.shape[1] == self.shape[0] else y[:, :self.shape[0]].contiguous()

    def levels(self) -> torch.Tensor:
        """(N padded, K) the stored levels in [0, 15], read back from the packed layout."""
        rows, half = self.packed.shape
        blocks = self.packed.view(rows // _INT4_BLOCK_ROWS, half * 2, _INT4_BLOCK_ROWS // 2)
        both = torch.cat([blocks & 15, blocks >> 4], dim=2)  # (blocks, K, 64)
        return both.transpose(1, 2).reshape(rows, half * 2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, in_features = self.packed.shape[0], self.shape[1]
        groups = self.levels().float().view(rows, in_features // INT4_GROUP, INT4_GROUP)
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # (K / 32, N padded)
        w = (groups - 8) * scale.t()[..., None] + zero.t()[..., None]
        return w.reshape(rows, in_features)[:self.shape[0]].to(dtype or self.dtype)


def check_int4_width(in_features: int) -> None:
    if in_features % INT4_GROUP:
        raise QuantizationError(
            f"int4 quantizes groups of {INT4_GROUP} inputs, and a projection has "
            f"{in_features}; accepted: int4 for models whose projections' input widths are "
            f"multiples of {INT4_GROUP}, or int8 for any")


class QuantizedRows:
    """Rows start:stop of a quantized weight: one projection of a group stored together (q,
    k and v; gate and up), whose GEMM is the group's (projection_group.joint_weight)."""

    def __init__(self, store: QuantizedWeight, start: int, stop: int):
        self.store, self.start, self.stop = store, start, stop
        self.shape = torch.Size((stop - start, store.shape[1]))
        self.dtype = store.dtype

    @property
    def device(self) -> torch.device:
        return self.store.device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.store.dequantize(dtype)[self.start:self.stop]


def quantize_weight(weight: torch.Tensor, quantize: str, dtype: torch.dtype) -> QuantizedWeight:
    return (Int8Weight if quantize == "int8" else Int4Weight).quantize(weight, dtype)


Weight = torch.Tensor | QuantizedWeight | QuantizedRows


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a float or a quantized frozen weight; differentiable with
    respect to x (a quantized weight's backward reads it dequantized, as QLoRA does)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    store, columns = (weight.store, slice(weight.start, weight.stop)) \
        if isinstance(weight, QuantizedRows) else (weight, slice(None))
    differentiable = x.requires_grad and torch.is_grad_enabled()
    y = (_QuantizedLinear.apply(x, store) if differentiable else store.matmul(x))[:, columns]
    return y if bias is None else y + bias


def dense(weight: Weight) -> torch.Tensor:
    """The weight's values as a float tensor (itself, for a float weight)."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return weight.matmul(x)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.weight.dequantize(dy.dtype), None
