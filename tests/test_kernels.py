"""The segmented LoRA ops, each implementation against a naive per-row computation and the
fast ones (batched torch, Triton) against the reference, over the adapter popularity patterns
tenants really produce and sizes chosen to be awkward. The Triton kernels run in Triton's
interpreter on the CPU, in float32 (the interpreter's tl.dot is wrong on bf16)."""

from __future__ import annotations

import random

import pytest
import torch

from cotune.kernels import sgmv_reference, sgmv_rows, sgmv_torch, sgmv_triton
from cotune.kernels.choice import KernelChoiceError, backend
from cotune.kernels.lora_batch import LoraBatch
from cotune.kernels.segmented_lora import segmented_lora
from cotune.model.loading import load_model

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")
# Triton runs in its interpreter on the CPU (conftest switches it on where there is no GPU).
IMPLEMENTATIONS = {"reference": sgmv_reference, "torch": sgmv_torch, "triton": sgmv_triton}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def ops(request):
    """Each implementation."""
    return IMPLEMENTATIONS[request.param]


def _row_slots(num_rows: int, num_slots: int, popularity: str, rng: random.Random) -> list[int]:
    """The adapter slot of every row (-1: no adapter), drawn as tenants behave."""
    if popularity == "distinct":
        return [i % num_slots for i in range(num_rows)]
    if popularity == "uniform":
        return [rng.randrange(-1, num_slots) for _ in range(num_rows)]
    if popularity == "zipf":  # zipf with exponent 1.5
        weights = [1 / (k + 1) ** 1.5 for k in range(num_slots)]
        return rng.choices(range(num_slots), weights, k=num_rows)
    if popularity == "identical":
        return [num_slots - 1] * num_rows
    return [0 if rng.random() < 0.9 else rng.randrange(-1, num_slots) for _ in range(num_rows)]


def _segments(row_slots: list[int]) -> LoraBatch:
    """Cuts rows into runs of one slot."""
    starts, slots = [0], []
    for i, slot in enumerate(row_slots):
        if slots and slots[-1] == slot:
            starts[-1] = i + 1
        else:
            slots.append(slot)
            starts.append(i + 1)
    return LoraBatch.of(starts, slots)


def _pools(num_slots: int, ranks: list[int], d_in: int, d_out: int):
    """A and B pools padded with zeros beyond each slot's rank."""
    max_rank = max(ranks)
    a = torch.zeros(num_slots, max_rank, d_in)
    b = torch.zeros(num_slots, d_out, max_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in)
        b[s, :, :r] = torch.randn(d_out, r)
    return a, b, torch.rand(num_slots) + 0.5


def _naive_delta(x, a, b, scales, row_slots):
    """Row by row: delta[t] = scale * B[slot] @ (A[slot] @ x[t])."""
    rows = [torch.zeros(b.shape[1]) if s < 0 else scales[s] * (b[s] @ (a[s] @ x[t]))
            for t, s in enumerate(row_slots)]
    return torch.stack(rows)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("num_rows", [1, 7, 133])
def test_shrink_then_expand_matches_naive_rows(ops, popularity, num_rows, seed):
    rng = random.Random(seed * 31 + num_rows)
    num_slots, d_in, d_out = 6, 173, 270
    ranks = [rng.choice(range(1, 65)) for _ in range(num_slots)]
    a, b, scales = _pools(num_slots, ranks, d_in, d_out)
    row_slots = _row_slots(num_rows, num_slots, popularity, rng)
    segs = _segments(row_slots)
    x = torch.randn(num_rows, d_in)
    y0 = torch.randn(num_rows, d_out)
    y = ops.sgmv_expand(y0.clone(), ops.sgmv_shrink(x, a, segs), b, segs, scales)
    expected = y0 + _naive_delta(x, a, b, scales, row_slots)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{m} (seed {seed}, ranks {ranks})")


def test_rows_without_adapter_are_untouched_bit_for_bit(ops, seed):
    row_slots = [-1, -1, 0, 0, -1, 1, -1]
    segs = _segments(row_slots)
    a, b, scales = _pools(2, [3, 9], 17, 29)
    x, y0 = torch.randn(7, 17), torch.randn(7, 29)
    y = ops.sgmv_expand(y0.clone(), ops.sgmv_shrink(x, a, segs), b, segs, scales)
    untouched = torch.tensor([s < 0 for s in row_slots])
    assert torch.equal(y[untouched], y0[untouched])
    assert not torch.equal(y[~untouched], y0[~untouched])


def test_no_adapter_anywhere_leaves_output_identical(ops, seed):
    segs = _segments([-1] * 11)
    a, b, scales = _pools(3, [4, 4, 4], 8, 8)
    y0 = torch.randn(11, 8)
    y = ops.sgmv_expand(y0.clone(), ops.sgmv_shrink(torch.randn(11, 8), a, segs),
                        b, segs, scales)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("popularity", POPULARITY)
def test_segmented_lora_gradients_match_autograd_of_naive_rows(ops, popularity, seed):
    rng = random.Random(seed + 7)
    num_slots, d_in, d_out = 4, 19, 23
    ranks = [rng.choice([1, 5, 16, 64]) for _ in range(num_slots)]
    a, b, scales = _pools(num_slots, ranks, d_in, d_out)
    row_slots = _row_slots(37, num_slots, popularity, rng)
    segs = _segments(row_slots)
    x = torch.randn(37, d_in)
    upstream = torch.randn(37, d_out)

    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    (segmented_lora(*leaves, scales, segs, ops) * upstream).sum().backward()
    naive = [t.clone().requires_grad_() for t in (x, a, b)]
    (_naive_delta(*naive, scales, row_slots) * upstream).sum().backward()
    for name, got, want in zip(("dx", "dA", "dB"), leaves, naive):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m} (seed {seed})")


def test_segmented_lora_passes_gradcheck_in_float64(ops, seed):
    segs = _segments([1, 1, -1, 0, 0, 0, 2, 1])
    a, b, scales = _pools(3, [2, 3, 1], 5, 4)
    inputs = [t.double().requires_grad_() for t in (torch.randn(8, 5), a, b)]
    assert torch.autograd.gradcheck(
        lambda x, a, b: segmented_lora(x, a, b, scales.double(), segs, ops), inputs)


def test_weight_grad_reduces_over_all_segments_of_one_adapter(ops, seed):
    """Adapter 0 appears in two separate segments; its gradient sums both."""
    segs = LoraBatch.of([0, 3, 5, 9], [0, 1, 0])
    grad_out, inputs = torch.randn(9, 4), torch.randn(9, 6)
    dw = ops.sgmv_weight_grad(grad_out, inputs, segs, num_slots=2)
    rows0 = torch.tensor([0, 1, 2, 5, 6, 7, 8])
    torch.testing.assert_close(dw[0], grad_out[rows0].T @ inputs[rows0])
    torch.testing.assert_close(dw[1], grad_out[3:5].T @ inputs[3:5])


def test_kernel_choice_rejects_unknown_and_unavailable(monkeypatch):
    monkeypatch.setenv("COTUNE_KERNELS", "cuda-magic")
    with pytest.raises(KernelChoiceError, match="not accepted"):
        backend()
    monkeypatch.setenv("COTUNE_KERNELS", "reference")
    assert backend() is sgmv_reference
    monkeypatch.setenv("COTUNE_KERNELS", "auto")
    assert backend("cpu") is sgmv_torch  # Triton is for CUDA tensors
    monkeypatch.setenv("COTUNE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend("cpu") is sgmv_triton
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelChoiceError, match="runs on CUDA devices, not cpu"):
        backend("cpu")


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_fast_ops_equal_the_reference(name, popularity, seed):
    rng = random.Random(seed + 11)
    num_slots, d_in, d_out, num_rows = 9, 173, 270, 133
    ranks = [rng.choice(range(1, 65)) for _ in range(num_slots)]
    a, b, scales = _pools(num_slots, ranks, d_in, d_out)
    segs = _segments(_row_slots(num_rows, num_slots, popularity, rng))
    x, y0 = torch.randn(num_rows, d_in), torch.randn(num_rows, d_out)
    ops, ref = IMPLEMENTATIONS[name], sgmv_reference
    h = ref.sgmv_shrink(x, a, segs, scales)
    y = ref.sgmv_expand(y0.clone(), h, b, segs, scales)
    # Each op on the same inputs as the reference's; bounds relative to the largest value
    # (the weight gradient sums 133 rows of products).
    pairs = {
        "shrink": (ops.sgmv_shrink(x, a, segs, scales), h),
        "expand": (ops.sgmv_expand(y0.clone(), h, b, segs, scales), y),
        "weight_grad": (ops.sgmv_weight_grad(y, x, segs, num_slots, scales),
                        ref.sgmv_weight_grad(y, x, segs, num_slots, scales)),
    }
    for op, (got, want) in pairs.items():
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                   msg=lambda m, op=op: f"{op}: {m} (seed {seed})")


# Decode-step layouts: rows sorted by adapter, often of one length, often on consecutive slots;
# the batched torch ops take views instead of copies there.
DECODE_LAYOUTS = {
    "block, consecutive slots": [0, 0, 1, 1, 2, 2],
    "block after base rows": [-1, -1, -1, 1, 1, 2, 2, 3, 3],
    "block, scattered slots": [4, 4, 4, 1, 1, 1, 3, 3, 3],
    "one row each, consecutive": [2, 3, 4, 5],
    "uneven, consecutive": [-1, 2, 2, 2, 3, 4, 4],
    "block, then base rows": [0, 0, 1, 1, -1],
    # many distinct adapters: the batched torch ops run row by row on the pool in place
    "one row each, scattered": [5, 1, 3, 0, 4],
    "scattered, base rows between": [-1, 4, 2, -1, 5, 5, 0],
    "one row each, then a prefill": [3, 1, 4, 0, 0, 0, 0, 2],
}
ROW_BY_ROW = ("one row each, scattered", "scattered, base rows between",
              "one row each, then a prefill")


@pytest.mark.parametrize("column_major", [False, True], ids=["row-major", "column-major"])
@pytest.mark.parametrize("layout", list(DECODE_LAYOUTS))
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_fast_ops_on_decode_layouts(name, layout, column_major, seed):
    """Also pools as VirtualizedLinear holds them: last two dimensions stored swapped, and a
    rank slice taken as a view."""
    ops = IMPLEMENTATIONS[name]
    row_slots = DECODE_LAYOUTS[layout]
    segs = _segments(row_slots)
    num_slots, d_in, d_out = 6, 21, 34
    a, b, scales = _pools(num_slots, [3, 8, 1, 8, 5, 2], d_in, d_out)
    if column_major:
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    rank = 6  # a rank slice, as the layer takes one: a view into the padded pool
    a, b = a[:, :rank], b[:, :, :rank]
    x, y0 = torch.randn(len(row_slots), d_in), torch.randn(len(row_slots), d_out)
    h = ops.sgmv_shrink(x, a, segs)
    y = ops.sgmv_expand(y0.clone(), h, b, segs, scales)
    torch.testing.assert_close(h, sgmv_reference.sgmv_shrink(x, a, segs))
    torch.testing.assert_close(ops.sgmv_shrink(x, a, segs, scales),
                               sgmv_reference.sgmv_shrink(x, a, segs, scales))
    torch.testing.assert_close(y, y0 + _naive_delta(x, a, b, scales, row_slots))
    untouched = torch.tensor([s < 0 for s in row_slots])
    assert torch.equal(y[untouched], y0[untouched])
    torch.testing.assert_close(
        ops.sgmv_weight_grad(y, x, segs, num_slots, scales),
        sgmv_reference.sgmv_weight_grad(y, x, segs, num_slots, scales))


def test_batched_torch_runs_row_by_row_exactly_where_it_would_gather_short_segments():
    """The row-by-row products read the pool in place where VirtualizedLinear's storage allows
    (last two dimensions swapped); any other storage is gathered as before."""
    a, b, _ = _pools(6, [8] * 6, 21, 34)
    stored_a = a.transpose(1, 2).contiguous().transpose(1, 2)[:, :6]
    stored_b = b.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :6]
    for layout, row_slots in DECODE_LAYOUTS.items():
        segs = _segments(row_slots)
        plan = sgmv_torch._plan(segs.starts, segs.slots, "cpu")
        assert (plan.bags is not None) == (layout in ROW_BY_ROW), layout
    table, rows_per_slot = sgmv_rows.stored_rows(stored_a)
    assert (tuple(table.shape), rows_per_slot) == ((6 * 21, 8), 21)
    assert torch.equal(table[3 * 21 + 5, :6], stored_a[3, :, 5])
    table, rows_per_slot = sgmv_rows.stored_rows(stored_b)
    assert (tuple(table.shape), rows_per_slot) == ((6 * 8, 34), 8)
    assert torch.equal(table[2 * 8 + 4], stored_b[2, :, 4])
    assert sgmv_rows.stored_rows(a[:, :6]) is None  # row-major A: its rows are not adjacent


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("kernels", ["per-row", "segment"])
def test_triton_per_row_and_segment_kernels_both_equal_the_reference(kernels, popularity, seed,
                                                                      monkeypatch):
    """Whatever the segment lengths, each launch shape alone (forced here) is exact. Sizes
    take several blocks of the interpreter's config (triton_configs.FALLBACK), with a partial
    last one."""
    monkeypatch.setattr(sgmv_triton, "DECODE_MAX_ROWS", 10**9 if kernels == "per-row" else 0)
    rng = random.Random(seed + 5)
    ranks = [rng.choice(range(1, 65)) for _ in range(5)]
    a, b, scales = _pools(5, ranks, 173, 270)
    segs = _segments(_row_slots(61, 5, popularity, rng))
    x, y0 = torch.randn(61, 173), torch.randn(61, 270)
    for scale in (None, scales):
        h = sgmv_triton.sgmv_shrink(x, a, segs, scale)
        torch.testing.assert_close(h, sgmv_reference.sgmv_shrink(x, a, segs, scale),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{m} (seed {seed})")
        y = sgmv_triton.sgmv_expand(y0.clone(), h, b, segs, scale)
        torch.testing.assert_close(y, sgmv_reference.sgmv_expand(y0.clone(), h, b, segs,
                                                                 scale),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{m} (seed {seed})")


@pytest.mark.parametrize("storage", ["transposed", "mixed"])
@pytest.mark.parametrize("popularity", ["distinct", "skewed"])  # per-row and segment kernels
def test_slices_equal_one_op_per_slice(ops, popularity, storage, seed):
    """q, k and v as slices: one input, pools of one rank (VirtualizedLinear's transposed
    layout, rank-sliced; "mixed": the first pool row-major, so that the layouts differ),
    outputs as columns of one y of unequal widths."""
    rng = random.Random(seed + 3)
    num_slots, d_in, widths, rank = 5, 173, [70, 30, 30], 20
    ranks = [rng.choice(range(1, 33)) for _ in range(num_slots)]
    pools = [_pools(num_slots, ranks, d_in, d) for d in widths]
    a_pools = [a.transpose(1, 2).contiguous().transpose(1, 2)[:, :rank] for a, _, _ in pools]
    b_pools = [b.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :rank] for _, b, _ in pools]
    if storage == "mixed":
        a_pools[0], b_pools[0] = pools[0][0][:, :rank], pools[0][1][:, :, :rank]
    scales = [s for _, _, s in pools]
    row_slots = _row_slots(41, num_slots, popularity, rng)
    segs = _segments(row_slots)
    x, y0 = torch.randn(41, d_in), torch.randn(41, sum(widths))
    offsets = [0, 70, 100]

    h = ops.sgmv_shrink_slices(x, a_pools, segs)
    y = ops.sgmv_expand_slices(y0.clone(), h, b_pools, offsets, segs, scales)
    for j, (a, b, s, offset, width) in enumerate(zip(a_pools, b_pools, scales, offsets, widths)):
        h_j = sgmv_reference.sgmv_shrink(x, a, segs)
        torch.testing.assert_close(h[:, j * rank:(j + 1) * rank], h_j, rtol=1e-4, atol=1e-4)
        want = sgmv_reference.sgmv_expand(y0[:, offset:offset + width].clone(), h_j, b, segs,
                                          s)
        torch.testing.assert_close(y[:, offset:offset + width], want, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, j=j: f"slice {j}: {m} (seed {seed})")
    untouched = torch.tensor([s < 0 for s in row_slots])
    assert torch.equal(y[untouched], y0[untouched])


def test_segments_that_do_not_cut_rows_into_runs_are_refused():
    with pytest.raises(ValueError, match="starts .S\\+1,. and slots .S,."):
        LoraBatch.of([0, 3], [0, 1])
    with pytest.raises(ValueError, match="rise from 0"):
        LoraBatch.of([0, 5, 3], [0, 1])
    with pytest.raises(ValueError, match="-1 .no adapter."):
        LoraBatch.of([0, 2], [-2])
    batch = LoraBatch.of([0, 2, 7], [3, -1])
    assert (batch.rows, batch.top_slot) == (7, 3)


@pytest.mark.parametrize("defect", ["dtype", "d_in", "rows", "slot", "scales", "h"])
def test_triton_wrappers_refuse_what_a_launch_would_read_as_garbage(defect):
    a, b, scales = _pools(3, [4, 4, 4], 16, 24)
    x, y, segs = torch.randn(9, 16), torch.randn(9, 24), _segments([0] * 4 + [2] * 5)
    h = torch.randn(9, 4)
    if defect == "dtype":
        x = x.double()
    elif defect == "d_in":
        x = torch.randn(9, 15)
    elif defect == "rows":
        x, y, h = x[:6], y[:6], h[:6]
    elif defect == "slot":
        segs = _segments([0] * 4 + [3] * 5)
    elif defect == "scales":
        scales = scales[:2]
    else:
        h = torch.randn(9, 5)
    with pytest.raises(ValueError, match="accepted|covers rows|uses slot"):
        if defect in ("h",):
            sgmv_triton.sgmv_expand(y, h, b, segs, scales)
        else:
            sgmv_triton.sgmv_shrink(x, a, segs, scales)
            sgmv_triton.sgmv_expand(y, h, b, segs, scales)


def test_triton_tables_of_pools_are_kept_where_the_caller_says_across_batches():
    a, b, scales = _pools(3, [4, 4, 4], 16, 24)
    x, tables = torch.randn(9, 16), {}
    for row_slots in ([0] * 4 + [2] * 5, [1] * 9):  # two steps' batches, one pool
        sgmv_triton.sgmv_shrink(x, a, _segments(row_slots), scales, tables=tables)
    assert len(tables) == 2  # the pool's addresses and its scales', made once for both
    batch = _segments([1] * 9)
    sgmv_triton.sgmv_shrink(x, a, batch, scales)  # no caller's dict: kept in the batch
    assert len(tables) == 2


def test_a_model_runs_the_kernels_chosen_when_it_was_loaded(tiny_checkpoint, monkeypatch):
    _, path = tiny_checkpoint
    monkeypatch.setenv("COTUNE_KERNELS", "reference")
    chosen = load_model(path)
    monkeypatch.setenv("COTUNE_KERNELS", "torch")  # read once, at the load: no effect now
    told = load_model(path, kernels="torch")
    assert {m.ops for m in chosen.lora_modules().values()} == {sgmv_reference}
    assert {m.ops for m in told.lora_modules().values()} == {sgmv_torch}
    assert told.model.layers[0].self_attn.qkv_joint is None  # batched torch: stored apart
    fused = load_model(path, kernels="triton")  # in the interpreter (conftest)
    attention = fused.model.layers[0].self_attn
    weight, _ = attention.qkv_joint  # side by side: one GEMM, decided at the load
    assert torch.equal(weight, torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                          attention.v_proj.weight]))


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dora_rescale_equals_the_reference_and_leaves_other_rows(popularity, with_bias, seed):
    rng = random.Random(seed + 13)
    num_slots, d_out, num_rows = 7, 91, 53
    row_slots = _row_slots(num_rows, num_slots, popularity, rng)
    segs = _segments(row_slots)
    gains = torch.rand(num_slots, d_out) + 0.5
    bias = torch.randn(d_out) if with_bias else None
    y0 = torch.randn(num_rows, 2 * d_out)[:, 7:7 + d_out]  # a column slice, as a group's
    want = sgmv_reference.sgmv_rescale(y0.clone(), gains, bias, segs)
    b = 0 if bias is None else bias
    for t, slot in enumerate(row_slots):  # the semantics, row by row
        expected = y0[t] if slot < 0 else gains[slot] * (y0[t] - b) + b
        torch.testing.assert_close(want[t], expected)
    for ops in (sgmv_torch, sgmv_triton):
        y = y0.clone()
        assert ops.sgmv_rescale(y, gains, bias, segs) is y
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
