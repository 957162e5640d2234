"""The Triton forward kernels (shrink, expand) against their reference twins, in Triton's
interpreter on the CPU (conftest switches it on where there is no GPU; float32: the
interpreter's tl.dot is wrong on bf16)."""

from __future__ import annotations

import random

import pytest
import torch
from test_kernels import POPULARITY, _pools, _row_slots, _segments

from cotune.kernels import sgmv_reference

sgmv_triton = pytest.importorskip("cotune.kernels.sgmv_triton")


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_rows", [1, 7, 133])
def test_triton_shrink_and_expand_equal_the_reference(popularity, num_rows, seed):
    rng = random.Random(seed * 17 + num_rows)
    num_slots, d_in, d_out = 7, 45, 70  # neither a multiple of any block
    ranks = [rng.choice(range(1, 65)) for _ in range(num_slots)]  # mixed in one launch
    a, b, scales = _pools(num_slots, ranks, d_in, d_out)
    row_slots = _row_slots(num_rows, num_slots, popularity, rng)
    starts, slots = _segments(row_slots)
    x, y0 = torch.randn(num_rows, d_in), torch.randn(num_rows, d_out)
    for scale in (None, scales):
        h = sgmv_triton.sgmv_shrink(x, a, starts, slots, scale)
        torch.testing.assert_close(h, sgmv_reference.sgmv_shrink(x, a, starts, slots, scale),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{m} (seed {seed})")
        y = sgmv_triton.sgmv_expand(y0.clone(), h, b, starts, slots, scale)
        want = sgmv_reference.sgmv_expand(y0.clone(), h, b, starts, slots, scale)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{m} (seed {seed})")
        untouched = torch.tensor([s < 0 for s in row_slots])
        assert torch.equal(y[untouched], y0[untouched])


def test_triton_kernels_read_transposed_rank_sliced_pools(seed):
    """Pools as VirtualizedLinear holds them: last two dimensions stored swapped, and a rank
    slice taken as a view."""
    row_slots = [-1, 2, 2, 0, 0, 0, -1, 3]
    starts, slots = _segments(row_slots)
    a, b, scales = _pools(4, [5, 1, 12, 33], 37, 29)
    a = a.transpose(1, 2).contiguous().transpose(1, 2)[:, :20]
    b = b.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :20]
    x, y0 = torch.randn(8, 37), torch.randn(8, 29)
    h = sgmv_triton.sgmv_shrink(x, a, starts, slots)
    y = sgmv_triton.sgmv_expand(y0.clone(), h, b, starts, slots, scales)
    torch.testing.assert_close(h, sgmv_reference.sgmv_shrink(x, a, starts, slots),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, sgmv_reference.sgmv_expand(y0.clone(), h, b, starts, slots,
                                                             scales), rtol=1e-4, atol=1e-4)
    assert torch.equal(y[[0, 6]], y0[[0, 6]])


def test_triton_kernels_with_no_adapter_rows_change_nothing(seed):
    starts, slots = _segments([-1] * 9)
    a, b, scales = _pools(2, [4, 4], 16, 16)
    y0 = torch.randn(9, 16)
    h = sgmv_triton.sgmv_shrink(torch.randn(9, 16), a, starts, slots)
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(sgmv_triton.sgmv_expand(y0.clone(), h, b, starts, slots, scales), y0)
