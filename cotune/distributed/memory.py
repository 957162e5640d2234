"""Bytes a rank actually holds, by kind: what the planner's per-rank estimates are checked
against."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from cotune.model.virtualized_linear import VirtualizedLinear


@dataclass(frozen=True)
class RankBytes:
    base_shard: int  # this rank's partitions of the base (the whole base when not sharded)
    kv_cache: int
    adapter_slots: int  # the slot pools of every VirtualizedLinear
    training_lora: int  # LoRA weights of running jobs and their gradients
    optimizer_state: int  # AdamW's moments of running jobs

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def allocated_bytes(engine) -> RankBytes:
    """What this rank's engine has allocated, between steps (a step gathers one layer at a
    time and the head on top of this)."""
    base = sum(_param_bytes(p) for p in engine.model.parameters())
    kv = sum(_bytes(t) for t in (*engine.cache.keys, *engine.cache.values))
    slots = sum(_bytes(t) for m in engine.model.modules() if isinstance(m, VirtualizedLinear)
                for t in (m.a_pool, m.b_pool, m.scales) if t is not None)
    lora = optimizer = 0
    for trainer in engine.trainers:
        for p in trainer.lora.parameters():
            lora += _bytes(p) + (0 if p.grad is None else _bytes(p.grad))
        optimizer += sum(_bytes(t) for state in trainer.optimizer.state.values()
                         for t in state.values() if isinstance(t, torch.Tensor))
    return RankBytes(base, kv, slots, lora, optimizer)


def gathered_bytes(model) -> int:
    """Bytes a sharded step holds whole on top of allocated_bytes: the head (embeddings, final
    norm, lm_head) for the whole step, and one decoder layer at a time."""
    def whole(params) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)

    head = [model.model.embed_tokens.weight, model.model.norm.weight]
    head += [] if model.lm_head is None else [model.lm_head.weight]
    return whole(head) + max(whole(layer.parameters()) for layer in model.model.layers)


def _param_bytes(param: torch.Tensor) -> int:
    shard = getattr(param, "ds_tensor", None)  # a ZeRO-3 partition: only it stays resident
    return _bytes(param if shard is None else shard)


def _bytes(tensor: torch.Tensor) -> int:
    # the storage, not the view: a slot pool is a transposed view of its whole allocation
    return tensor.untyped_storage().nbytes()
