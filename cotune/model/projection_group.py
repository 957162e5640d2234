"""Projections of one layer that read the same input (q, k and v; gate and up), computed
together: one base GEMM over their weights stored side by side, and their served LoRA as the
slices of one shrink and one expand (one launch each with the Triton kernels).

Whether a group's weights lie side by side is decided once, when the model is loaded
(`joint_weight`, kept by the layer: CausalLM.decide_fusion); a group whose joint weight is
None runs each projection's GEMM alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cotune.model.lora_routing import LoraRouting
from cotune.model.quantized import QuantizedRows, QuantizedWeight, linear
from cotune.model.row_groups import RowGroup, apart, shared_linear
from cotune.model.virtualized_linear import VirtualizedLinear, served_slots


def side_by_side(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the weights (out_j, in) of a group as views of one (in, sum out_j) row-major
    store: each view has strides (1, sum out_j), like loading._column_major, and the group's
    joint weight is one view of the same store (see joint_weight). Biases (out_j,) become
    views of one (sum out_j,) vector."""
    widths, offsets = [t.shape[0] for t in tensors], _offsets(tensors)
    first = tensors[0]
    if first.dim() == 1:
        store = torch.cat(list(tensors))
        return [store[o:o + w] for o, w in zip(offsets, widths)]
    store = torch.empty(first.shape[1], sum(widths), dtype=first.dtype, device=first.device)
    for t, o, w in zip(tensors, offsets, widths):
        store[:, o:o + w] = t.t()
    return [store[:, o:o + w].t() for o, w in zip(offsets, widths)]


def joint_weight(layers: Sequence[VirtualizedLinear]):
    """(weight (sum out_j, in), bias or None) of the group as views of the store side_by_side
    made (or, quantized, the store whose rows the layers' weights are), or None when the
    layers' weights do not lie that way (then each runs alone)."""
    weights = [layer.weight for layer in layers]
    weight = _joint_float(weights) if isinstance(weights[0], torch.Tensor) else \
        _joint_quantized(weights)
    if weight is None:
        return None
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None or b.untyped_storage().data_ptr()
           != biases[0].untyped_storage().data_ptr() or b.storage_offset()
           != biases[0].storage_offset() + o for b, o in zip(biases, _offsets(weights))):
        return None
    return weight, biases[0].as_strided((weight.shape[0],), (1,), biases[0].storage_offset())


def _joint_float(weights: list[torch.Tensor]) -> torch.Tensor | None:
    total, d_in = sum(w.shape[0] for w in weights), weights[0].shape[1]
    start = weights[0].storage_offset()
    for w, offset in zip(weights, _offsets(weights)):
        if (not isinstance(w, torch.Tensor) or w.stride() != (1, total)
                or w.storage_offset() != start + offset
                or w.untyped_storage().data_ptr() != weights[0].untyped_storage().data_ptr()):
            return None
    return weights[0].as_strided((total, d_in), (1, total), start)


def _joint_quantized(weights: list[QuantizedRows]) -> QuantizedWeight | None:
    store = weights[0].store
    if any(not isinstance(w, QuantizedRows) or w.store is not store or w.start != offset
           for w, offset in zip(weights, _offsets(weights))):
        return None
    return store if weights[-1].stop == store.shape[0] else None


def _offsets(tensors) -> list[int]:
    """Where each tensor's rows begin when they are stacked: 0, out_0, out_0 + out_1, ..."""
    widths = [t.shape[0] for t in tensors]
    return [sum(widths[:j]) for j in range(len(widths))]


Joint = tuple[torch.Tensor, torch.Tensor | None] | None  # joint_weight's answer


def project_together(layers: Sequence[VirtualizedLinear], x: torch.Tensor,
                     lora: LoraRouting | None, joint: Joint) -> list[torch.Tensor]:
    """[layer(x, lora) for layer in layers], computed together when their weights lie side by
    side (`joint`): outputs are column views of one (T, sum out_j) tensor."""
    if joint is None:
        return [layer(x, lora) for layer in layers]
    return _add_lora(layers, x, linear(x, *joint), lora)


def project_groups(layers: Sequence[VirtualizedLinear], xs: list[torch.Tensor],
                   groups: list[RowGroup], joint: Joint) -> list[list[torch.Tensor]]:
    """project_together for each group's rows (with its routing), the base GEMMs shared by
    every group: each weight is read once for all (row_groups.shared_linear). Per group, a
    list of the layers' outputs."""
    if len(groups) == 1:
        return [project_together(layers, xs[0], groups[0].batch.lora, joint)]
    if joint is not None:
        ys = shared_linear(xs, groups, *joint)
        return apart(groups, lambda g, x, y: _add_lora(layers, x, y, g.batch.lora), groups, xs,
                     ys)
    # stored apart: a GEMM per layer, each still over every group's rows
    per_layer = [shared_linear(xs, groups, layer.weight, layer.bias) for layer in layers]
    return apart(groups, lambda g, x, *ys: [
        _add_lora([layer], x, y, g.batch.lora)[0] for layer, y in zip(layers, ys)],
        groups, xs, *per_layer)


def _add_lora(layers: Sequence[VirtualizedLinear], x: torch.Tensor, y: torch.Tensor,
              lora: LoraRouting | None) -> list[torch.Tensor]:
    """Each layer's output, as y's columns (the group's base GEMM) plus its LoRA on x."""
    widths = [layer.out_features for layer in layers]
    if lora is None:
        return list(y.split(widths, dim=1))
    served = served_slots(layers, lora)
    if served is not None:
        batch, rank, _ = served
        # only the projections that hold an adapter in this step's slots (k_proj, say, when
        # the adapters target q and v): the others would add exactly zero
        offsets = _offsets([layer.weight for layer in layers])
        holders = [j for j, layer in enumerate(layers) if served_slots([layer], lora) is not None]
        # the group's first layer keeps the tables of the group's pools
        ops, tables = layers[0].ops, layers[0].kernel_tables
        with torch.no_grad():  # served rows carry no autograd state (see VirtualizedLinear)
            h = ops.sgmv_shrink_slices(x, [layers[j].a_pool[:, :rank] for j in holders], batch,
                                       tables=tables)
            ops.sgmv_expand_slices(y, h, [layers[j].b_pool[:, :, :rank] for j in holders],
                                   [offsets[j] for j in holders], batch,
                                   [layers[j].scales for j in holders], tables=tables)
            for j in holders:  # DoRA adapters' rows: each projection's columns rescaled
                dora = served_slots([layers[j]], lora)[2]
                if dora is not None:
                    ops.sgmv_rescale(y[:, offsets[j]:offsets[j] + layers[j].out_features],
                                     layers[j].gains, layers[j].bias, dora)
    return [layer.add_training(x, out, lora)
            for layer, out in zip(layers, y.split(widths, dim=1))]
