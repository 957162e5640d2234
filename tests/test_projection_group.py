"""Projections that read one input (q, k and v; gate and up), computed together: the same
outputs and gradients as each layer alone, with the batched torch ops and with Triton's."""

from __future__ import annotations

import pytest
import torch

from cotune.kernels import sgmv_torch, sgmv_triton
from cotune.model.lora_routing import LoraRouting, TrainableLora
from cotune.model.projection_group import joint_weight, project_together, side_by_side
from cotune.model.virtualized_linear import VirtualizedLinear

WIDTHS = {"q": 40, "k": 24, "v": 24}
D_IN, SLOTS, MAX_RANK = 33, 4, 16


def _layers(bias: bool, together: bool, ops=sgmv_torch) -> list[VirtualizedLinear]:
    """q, k and v with random weights and three resident adapters: slot 0 on q only, slot 1
    on all three, slot 3 on k and v; weights side by side when `together`; LoRA by `ops`."""
    generator = torch.Generator().manual_seed(0)
    layers = [VirtualizedLinear(D_IN, width, bias, name) for name, width in WIDTHS.items()]
    for layer in layers:
        layer.ops = ops
    weights = [torch.randn(layer.out_features, D_IN, generator=generator) for layer in layers]
    biases = [torch.randn(layer.out_features, generator=generator) for layer in layers]
    if together:
        weights, biases = side_by_side(weights), side_by_side(biases)
    for layer, w, b in zip(layers, weights, biases):
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        if bias:
            layer.bias = torch.nn.Parameter(b, requires_grad=False)
        layer.allocate_slots(SLOTS, MAX_RANK)
    for slot, rank, targets in ((0, 5, "q"), (1, 16, "qkv"), (3, 3, "kv")):
        for layer in layers:
            if layer.name in targets:
                layer.load_slot(slot, torch.randn(rank, D_IN, generator=generator),
                                torch.randn(layer.out_features, rank, generator=generator),
                                0.5 + slot)
    return layers


def _trainable() -> TrainableLora:
    generator = torch.Generator().manual_seed(1)
    return TrainableLora({"k": (torch.randn(4, D_IN, generator=generator),
                                torch.randn(WIDTHS["k"], 4, generator=generator), 2.0),
                          "q": (torch.randn(6, D_IN, generator=generator),
                                torch.randn(WIDTHS["q"], 6, generator=generator), 0.5)})


@pytest.mark.parametrize("kernels", [sgmv_torch, sgmv_triton], ids=["torch", "triton"])
@pytest.mark.parametrize("bias", [False, True])
def test_together_equals_each_layer_alone(kernels, bias, seed):
    together, alone = _layers(bias, True, kernels), _layers(bias, False, kernels)
    assert joint_weight(together) is not None and joint_weight(alone) is None
    x = torch.randn(18, D_IN)
    outputs, grads = [], []
    for layers in (together, alone):
        trainable = _trainable()
        # decode-like rows, base rows, a trained segment and a served one too long for the
        # per-row kernels
        lora = LoraRouting.from_sequences([1, 1, 2, 1, 4, 9],
                                          [0, 1, None, 3, trainable, 1])
        outs = project_together(layers, x, lora, joint_weight(layers))
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        outputs.append(outs)
        grads.append([p.grad for p in trainable.parameters()])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{m} (seed {seed})")
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x, *joint_weight(together))
    for out, want in zip(outputs[0], base.split(list(WIDTHS.values()), dim=1)):
        assert torch.equal(out[2:4], want[2:4]), "rows without an adapter are exactly the base"


def test_projections_holding_no_adapter_of_the_step_are_left_out(monkeypatch):
    """Rows on slot 0 only (an adapter on q alone): k and v are exactly the base, q equals q
    alone, and the LoRA ops get the q slice only."""
    seen, shrink = [], sgmv_torch.sgmv_shrink_slices

    def counting_shrink(x, weights, *rest, **options):
        seen.append(len(weights))
        return shrink(x, weights, *rest, **options)

    monkeypatch.setattr(sgmv_torch, "sgmv_shrink_slices", counting_shrink)
    together, alone = _layers(False, together=True), _layers(False, together=False)
    x = torch.randn(7, D_IN)
    lora = LoraRouting.from_sequences([3, 2, 2], [0, None, 0])
    q, k, v = project_together(together, x, lora, joint_weight(together))
    assert seen == [1]
    torch.testing.assert_close(q, alone[0](x, lora), rtol=1e-5, atol=1e-5)
    base = torch.nn.functional.linear(x, *joint_weight(together))
    assert torch.equal(torch.cat([q, k, v], dim=1)[:, WIDTHS["q"]:], base[:, WIDTHS["q"]:])


@pytest.mark.parametrize("together", [True, False])
def test_groups_share_the_gemm_and_equal_each_group_alone(together, monkeypatch, seed):
    """Served rows (no autograd) and trained rows through project_groups: the outputs and
    gradients of project_together on each group's rows alone, the served outputs with no
    autograd state, and the base weights read by one GEMM per projection for both."""
    from cotune.model import row_groups
    from cotune.model.projection_group import project_groups
    from cotune.model.row_groups import RowGroup

    layers = _layers(True, together)
    joint = joint_weight(layers)
    served_x, trained_x = torch.randn(7, D_IN), torch.randn(5, D_IN)
    served = LoraRouting.from_sequences([1, 2, 4], [0, None, 1])

    def groups(trainable):
        rows = LoraRouting.from_sequences([2, 3], [trainable, trainable])
        return [RowGroup(_Routed(served), None, None, grad=False),
                RowGroup(_Routed(rows), None, None, grad=True)]

    gemms, shared = [], row_groups.shared_linear
    monkeypatch.setattr(row_groups, "shared_linear", lambda *a: gemms.append(1) or shared(*a))
    monkeypatch.setattr("cotune.model.projection_group.shared_linear",
                        row_groups.shared_linear)
    trainable = _trainable()
    x = trained_x.clone().requires_grad_()
    (served_out, trained_out) = project_groups(layers, [served_x, x], groups(trainable), joint)
    assert len(gemms) == (1 if together else len(layers))
    assert not any(o.requires_grad for o in served_out)
    sum((o * (i + 1)).sum() for i, o in enumerate(trained_out)).backward()

    alone = _trainable()
    x_alone = trained_x.clone().requires_grad_()
    with torch.no_grad():
        want_served = project_together(layers, served_x, served, joint)
    want_trained = project_together(layers, x_alone, groups(alone)[1].batch.lora, joint)
    sum((o * (i + 1)).sum() for i, o in enumerate(want_trained)).backward()
    for got, want in zip(served_out + trained_out, want_served + want_trained):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{m} (seed {seed})")
    for got, want in zip([x.grad, *(p.grad for p in trainable.parameters())],
                         [x_alone.grad, *(p.grad for p in alone.parameters())]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Routed:
    """What project_groups reads of a group's batch: its routing."""

    def __init__(self, lora):
        self.lora = lora
