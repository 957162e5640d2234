"""A frozen base projection shared by every tenant, plus a pool of resident LoRA adapters."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cotune.kernels import sgmv_torch
from cotune.kernels.lora_batch import LoraBatch
from cotune.kernels.segmented_lora import segmented_lora
from cotune.model.lora_routing import LoraRouting
from cotune.model.quantized import dense, linear


class VirtualizedLinear(nn.Module):
    """y = x @ W.T + b for every row, plus each row's own LoRA delta.

    The base GEMM runs once over all rows. Served rows read their adapter from the slot
    pool (no autograd state); trained rows read the TrainableLora's parameters and are
    differentiable with respect to them. Rows with no adapter get exactly the base output.

    Pool layout (slots padded with zeros to max_rank):
      a_pool: (num_slots, max_rank, in_features)
      b_pool: (num_slots, out_features, max_rank)
      scales: (num_slots,) float32, alpha/r or alpha/sqrt(r)
      gains:  (num_slots, out_features) float32, DoRA's m / ||W + s B A|| per output (1
              where the slot's adapter is no DoRA)
    Both pools are stored with their last two dimensions swapped (like the base weight, see
    loading._column_major): the LoRA products then read plain row-major matrices, and a
    rank slice [:, :r] stays a view.

    A DoRA adapter's rows get g * (x W^T + s x A^T B^T) + bias, g its slot's gains: after the
    LoRA ops, its segments' outputs are rescaled (sgmv_rescale), as PEFT's DoRA computes them
    in inference (the norm is of the weights as they are when the adapter is placed).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str):
        super().__init__()
        self.in_features, self.out_features, self.name = in_features, out_features, name
        # float, or stored in 8 or 4 bits (quantized.py: the loader replaces the parameter)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.register_buffer("a_pool", None, persistent=False)
        self.register_buffer("b_pool", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        self.register_buffer("gains", None, persistent=False)
        # rank of the adapter in each slot, 0 for none, and whether it is DoRA; on the host,
        # where the routing is
        self.slot_ranks = torch.zeros(0, dtype=torch.int64, device="cpu")
        self._ranks = self.slot_ranks.numpy()
        self.slot_dora = torch.zeros(0, dtype=torch.bool, device="cpu")
        self._dora = self.slot_dora.numpy()
        self.holding = b""  # slot ranks and DoRA flags as bytes: a key for what this module holds
        # The implementation of the segmented ops, chosen once for the model
        # (CausalLM.use_kernels), and what it keeps of this module's pools across steps.
        self.ops = sgmv_torch
        self.kernel_tables: dict = {}

    @property
    def num_slots(self) -> int:
        return len(self.slot_ranks)

    @property
    def max_rank(self) -> int:
        return 0 if self.a_pool is None else self.a_pool.shape[1]

    def allocate_slots(self, num_slots: int, max_rank: int) -> None:
        """Creates an empty pool on the weight's device and dtype (drops resident adapters)."""
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.a_pool = torch.zeros(num_slots, self.in_features, max_rank, **like).transpose(1, 2)
        self.b_pool = torch.zeros(num_slots, max_rank, self.out_features, **like).transpose(1, 2)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=self.weight.device)
        self.gains = torch.ones(num_slots, self.out_features, dtype=torch.float32,
                                device=self.weight.device)
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int64, device="cpu")
        self._ranks = self.slot_ranks.numpy()  # the same memory, written without torch's cost
        self.slot_dora = torch.zeros(num_slots, dtype=torch.bool, device="cpu")
        self._dora = self.slot_dora.numpy()
        self._held_changed()
        self.kernel_tables = {}  # of the pools replaced

    @torch.no_grad()
    def dora_gains(self, a: torch.Tensor, b: torch.Tensor, scale: float,
                   magnitude: torch.Tensor) -> torch.Tensor:
        """DoRA's gains of an adapter on this module: m / ||W + scale B A|| for each output
        row, (out_features,) float32, as PEFT computes them; ValueError unless finite."""
        device = self.weight.device
        weight = dense(self.weight).float() + scale * (b.to(device, torch.float32)
                                                       @ a.to(device, torch.float32))
        gains = magnitude.to(self.weight.device, torch.float32) / torch.linalg.norm(weight, dim=1)
        if not torch.isfinite(gains).all():
            raise ValueError(f"{self.name}: the DoRA magnitude over the norm of W + scale B A is "
                             "not finite (a row of the weights has norm 0); accepted: weights "
                             "whose rows are not all zero")
        return gains

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float,
                  gains: torch.Tensor | None = None) -> None:
        """Makes an adapter resident: a (r, in_features), b (out_features, r), r <= max_rank,
        and for a DoRA adapter its gains (dora_gains)."""
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(
                f"{self.name}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                f"({self.in_features} -> {self.out_features})"
            )
        if rank > self.max_rank:
            raise ValueError(
                f"{self.name}: rank {rank} exceeds the pool's max_rank {self.max_rank}")
        # each element written once: the adapter's rank, then zeros up to max_rank (what an
        # earlier, larger adapter may have left there)
        self.a_pool[slot, :rank] = a.to(self.a_pool.dtype)
        self.b_pool[slot, :, :rank] = b.to(self.b_pool.dtype)
        if rank < self.max_rank:
            self.a_pool[slot, rank:] = 0
            self.b_pool[slot, :, rank:] = 0
        self.scales[slot] = scale
        self.gains[slot] = 1.0 if gains is None else gains
        self._set_rank(slot, rank, gains is not None)

    def release_slot(self, slot: int) -> None:
        """The slot serves nothing from now on (rank 0: the LoRA ops never read it); its
        weights stay until the slot is written again or cleared."""
        self._set_rank(slot, 0, False)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.a_pool[slot].zero_()
        self.b_pool[slot].zero_()
        self.scales[slot] = 0.0
        self.gains[slot] = 1.0
        self._set_rank(slot, 0, False)

    def _set_rank(self, slot: int, rank: int, dora: bool) -> None:
        self._ranks[slot], self._dora[slot] = rank, dora
        self._held_changed()

    def _held_changed(self) -> None:
        self.holding = self._ranks.tobytes() + self._dora.tobytes()

    def forward(self, x: torch.Tensor, lora: LoraRouting | None = None) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # (T, out_features), all rows at once
        if lora is None:
            return y
        served = served_slots([self], lora)
        if served is not None:
            batch, rank, dora = served
            ops, tables = self.ops, self.kernel_tables
            # Served rows carry no autograd state. Changing them in place leaves y's gradient
            # unchanged, and rows outside served segments are never written.
            with torch.no_grad():
                h = ops.sgmv_shrink(x, self.a_pool[:, :rank], batch, tables=tables)  # (T, rank)
                ops.sgmv_expand(y, h, self.b_pool[:, :, :rank], batch, self.scales,
                                tables=tables)
                if dora is not None:
                    ops.sgmv_rescale(y, self.gains, self.bias, dora)
        return self.add_training(x, y, lora)

    def _dora_training(self, dropped, y, norm, magnitude, delta, with_dropout: bool
                       ) -> torch.Tensor:
        """What a DoRA adapter adds to its trained rows' base output y, as PEFT trains it:
        (g - 1) * x W^T + g * delta, g = m / ||W + s B A|| with the norm taken as a constant
        (DoRA's paper, 4.3): differentiable in m, and in A and B through delta. With
        dropout, x W^T is of the dropped inputs, as PEFT computes it."""
        gains = (magnitude / norm).to(y.dtype)
        if with_dropout:
            base = linear(dropped, self.weight)
        else:
            base = y if self.bias is None else y - self.bias
        return (gains - 1) * base + gains * delta

    def add_training(self, x: torch.Tensor, y: torch.Tensor, lora: LoraRouting) -> torch.Tensor:
        """y plus the delta of the adapters being trained on their rows (differentiable)."""
        if not lora.has_training:
            return y
        only = lora.only_trainable
        if only is not None:  # plain products: no segments to route, no pool to build
            weights = only.weights(self.name)
            if weights is None:
                return y
            a, b, scale = weights
            dropped = lora.dropped(x)
            delta = F.linear(F.linear(dropped, a.to(x.dtype)), b.to(x.dtype)) * scale
            magnitude = only.magnitude(self.name)
            if magnitude is None:
                return y + delta
            norm = only.dora_norm(self.name, lambda: dense(self.weight))
            return y + self._dora_training(dropped, y, norm, magnitude, delta, only.dropout > 0)
        pool = lora.training_pool(self.name, x.device, x.dtype)
        if pool is None:
            return y
        a_pool, b_pool, scales, batch = pool
        return y + segmented_lora(lora.dropped(x), a_pool, b_pool, scales, batch, self.ops)


def served_slots(layers, lora: LoraRouting
                 ) -> tuple[LoraBatch, int, LoraBatch | None] | None:
    """(the segments on the slot where one of `layers` holds an adapter there, else -1; the
    largest rank they hold there; the segments on a DoRA adapter of theirs, or None when
    none is), or None when no segment is served. A layer without that adapter has zeros in
    the slot, so it adds exactly 0.

    Worked out once per step for each set of holdings (most layers hold alike), in tensor ops
    whatever the number of segments; the LoraBatch is the routing's one for those slots, so
    that what the kernels derive from it is derived once per step."""
    key = tuple(layer.holding for layer in layers)
    if key not in lora.served:
        lora.served[key] = _served_slots(layers, lora)
    return lora.served[key]


def _served_slots(layers, lora: LoraRouting
                  ) -> tuple[LoraBatch, int, LoraBatch | None] | None:
    ranks = torch.stack([layer.slot_ranks for layer in layers]).amax(0)  # (num_slots,)
    seg = lora.slots
    inside = (seg >= 0) & (seg < len(ranks))
    if len(ranks) == 0 or not bool(inside.any()):
        return None
    held = torch.where(inside, ranks[seg.clamp(0, len(ranks) - 1)], 0)  # (S,)
    if not bool(held.any()):
        return None
    served = held > 0
    slots = seg if bool(torch.equal(served, seg >= 0)) else torch.where(served, seg, -1)
    dora = None
    flags = torch.stack([layer.slot_dora for layer in layers]).any(0)  # (num_slots,)
    if bool(flags.any()):
        on_dora = served & flags[seg.clamp(0, len(flags) - 1)]
        if bool(on_dora.any()):
            dora = lora.batch(torch.where(on_dora, seg, -1))
    return lora.batch(slots), int(held.max()), dora
