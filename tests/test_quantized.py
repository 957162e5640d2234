"""The quantized weight formats (model/quantized.py): PyTorch's packed CPU matmuls against
their reference twin (the weights read back and multiplied in float), on irregular shapes;
GGUF's 4-bit blocks against gguf's own dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch.nn import functional as F

from cotune.model.gguf_int4 import block_levels
from cotune.model.quantization import QuantizationError, check_quantization
from cotune.model.quantized import INT4_GROUP, Int4Weight, Int8Weight, dense, linear

SHAPES = [(1, 32), (7, 96), (64, 64), (130, 576), (200, 160)]  # (out, in)
FORMATS = {"int8": Int8Weight, "int4": Int4Weight}


def _worst_rounding(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """Half a quantization step of each element: the most rounding may move it."""
    if kind == "int8":
        return (weight.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(weight)
    groups = weight.view(weight.shape[0], -1, INT4_GROUP)
    step = (groups.amax(dim=2) - groups.amin(dim=2)) / 15
    return (step[..., None] / 2).expand_as(groups).reshape(weight.shape)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_weights_read_back_within_half_a_step(kind, shape, seed):
    weight = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different ranges
    stored = FORMATS[kind].quantize(weight, torch.float32)
    back = stored.dequantize()
    assert back.shape == weight.shape and back.dtype == torch.float32
    assert ((back - weight).abs() <= _worst_rounding(kind, weight) * 1.0001 + 1e-6).all()
    out, d_in = shape
    if kind == "int8":  # a byte a weight, a scale a row
        assert stored.nbytes == out * d_in + 4 * out
    elif out % 64 == 0:  # half a byte a weight, a scale and a zero a group (rows padded to 64)
        assert stored.nbytes == out * d_in // 2 + out * d_in // INT4_GROUP * 8


def test_int4_levels_read_back_exactly_from_the_packed_layout(seed):
    levels = torch.randint(0, 16, (130, 96), dtype=torch.uint8)  # rows padded to 192
    scale, minimum = torch.rand(130, 3), torch.randn(130, 3)
    stored = Int4Weight.from_levels(levels, scale, minimum, torch.float32)
    assert torch.equal(stored.levels()[:130], levels)
    want = levels.float().view(130, 3, 32) * scale[..., None] + minimum[..., None]
    torch.testing.assert_close(stored.dequantize(), want.view(130, 96), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_packed_bfloat16_matmul_equals_its_reference_twin(kind, shape, rows, seed):
    """The kernel reads the packed layout as dequantize() does: x @ W.T in bfloat16 equals
    the same bfloat16 inputs times the read-back weights in float32, within bfloat16's
    rounding of the output."""
    stored = FORMATS[kind].quantize(torch.randn(shape), torch.bfloat16)
    x = torch.randn(rows, shape[1]).bfloat16()
    got = stored.matmul(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, shape[0])
    want = F.linear(x.float(), stored.dequantize(torch.float32))
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("kind", FORMATS)
def test_float32_matmul_is_exactly_the_dequantized_weights(kind, seed):
    stored = FORMATS[kind].quantize(torch.randn(130, 96), torch.float32)
    x = torch.randn(9, 96)
    assert torch.equal(stored.matmul(x), F.linear(x, stored.dequantize()))


@pytest.mark.parametrize("kind", FORMATS)
def test_rows_of_a_group_and_the_gradient_through_them(kind, seed):
    """A projection's rows of a group's store give its columns of the group's GEMM, and the
    gradient with respect to the input is that of the read-back weights (QLoRA's backward)."""
    store = FORMATS[kind].quantize(torch.randn(192, 64), torch.float32)
    rows = store.rows(64, 128)
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(64)
    y = linear(x, rows, bias)
    want_weight = store.dequantize()[64:128]
    torch.testing.assert_close(y, F.linear(x, want_weight, bias), rtol=0, atol=1e-5)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream @ want_weight, rtol=0, atol=1e-5)
    assert torch.equal(dense(rows), want_weight)


def test_int4_refuses_an_input_width_that_is_no_multiple_of_32():
    with pytest.raises(QuantizationError, match="multiples of 32.*int8 for any"):
        Int4Weight.quantize(torch.randn(8, 48), torch.float32)


def test_an_unknown_quantization_is_refused_naming_those_accepted():
    with pytest.raises(QuantizationError, match="'int3' is not supported; accepted: int8, int4"):
        check_quantization("int3")


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_4bit_blocks_give_ggufs_own_dequantization(kind):
    weights = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    blocks = quantize(weights, kind)
    levels, scale, minimum = block_levels(blocks, kind)
    stored = Int4Weight.from_levels(torch.from_numpy(levels), torch.from_numpy(scale).float(),
                                    torch.from_numpy(minimum).float(), torch.float32)
    torch.testing.assert_close(stored.dequantize(), torch.from_numpy(dequantize(blocks, kind)),
                               rtol=0, atol=1e-6)
    assert block_levels(quantize(weights, GGMLQuantizationType.Q8_0),
                        GGMLQuantizationType.Q8_0) is None
