"""The rows a forward pass trains: pieces of training examples (token-level training).

A long example runs as several pieces over several steps. Piece j attends to the keys and
values that pieces 0..j-1 left in the example's `ExampleKV`, and leaves its own there for
the pieces after it. Backward runs piece by piece in reverse order. Piece j's backward sends
gradients to the keys and values of the earlier pieces (`key_grads`, `value_grads`); piece
i < j takes what all later pieces sent as the upstream gradient of its own keys and values:

    dL/dk_i = d(loss_i)/dk_i + sum_{j > i} d(loss_j)/dk_i

so the gradients of the pieces add up to those of the whole example in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cotune.model.attention import attend_one
from cotune.model.config import ModelConfig
from cotune.model.lora_routing import LoraRouting, TrainableLora


class ExampleKV:
    """Keys (after RoPE) and values of one training example, per layer, as its pieces are
    forwarded, and the gradients that later pieces' backward sent to them. Plain tensors:
    the graph of a piece never reaches into them (see TrainingRows)."""

    def __init__(self, config: ModelConfig, length: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (length, config.num_kv_heads, config.head_dim)

        def per_layer():
            return [torch.zeros(shape, dtype=dtype, device=device)
                    for _ in range(config.num_layers)]

        self.keys, self.values = per_layer(), per_layer()  # (length, Hkv, D) each
        self.key_grads, self.value_grads = per_layer(), per_layer()


@dataclass(frozen=True)
class TrainingPiece:
    """Tokens [start, start + length) of one training example, trained with `lora`. `kv` is
    None for a whole example in one piece: it attends within itself and leaves nothing."""

    lora: TrainableLora
    start: int
    length: int
    kv: ExampleKV | None = None


@dataclass
class TrainingRows:
    """The training pieces of one forward pass, the last rows of its batch, piece after
    piece; each writes its keys and values to its example's ExampleKV (when it has one) and
    attends over everything there up to itself.

    With grad enabled (a differentiable pass over these rows, or a layer's recomputation in
    backward) the earlier pieces' keys and values enter as fresh leaves, whose gradients
    `send_gradients` adds to the ExampleKV, and each piece's own keys and values are
    recorded as outputs, with the gradients later pieces sent them as their upstream
    gradient: `backward(loss)` runs both. A recomputation (`writes` False) leaves the
    ExampleKV's keys and values as the forward wrote them."""

    pieces: list[TrainingPiece]
    writes: bool = True
    outputs: list[torch.Tensor] = field(default_factory=list)
    output_grads: list[torch.Tensor] = field(default_factory=list)
    # (layer, piece, earlier keys, earlier values) of the leaves made in this pass
    leaves: list[tuple[int, TrainingPiece, torch.Tensor, torch.Tensor]] = field(
        default_factory=list)
    # seconds the pass spent on these rows apart from the served ones (None: not apart)
    forward_seconds: float | None = None

    @property
    def lengths(self) -> list[int]:
        return [p.length for p in self.pieces]

    @property
    def past_lengths(self) -> list[int]:
        return [p.start for p in self.pieces]

    def routing(self) -> LoraRouting:
        """The adapters of these rows alone."""
        return LoraRouting.from_sequences(self.lengths, [p.lora for p in self.pieces])

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter being trained in these rows, each once."""
        loras = []
        for piece in self.pieces:
            if not any(piece.lora is lora for lora in loras):
                loras.append(piece.lora)
        return [p for lora in loras for p in lora.parameters()]

    def recomputation(self) -> TrainingRows:
        """The same pieces, for a layer's recomputation in backward (see above)."""
        return TrainingRows(self.pieces, writes=False)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (R, H, D), k, v (R, Hkv, D) of these rows -> (R, H, D)."""
        out, recording = [], torch.is_grad_enabled()
        for piece, qi, ki, vi in zip(self.pieces, q.split(self.lengths), k.split(self.lengths),
                                     v.split(self.lengths)):
            kv, start = piece.kv, piece.start
            if kv is not None:
                end = start + piece.length
                if self.writes:
                    kv.keys[layer][start:end] = ki.detach()
                    kv.values[layer][start:end] = vi.detach()
                if not recording:
                    ki, vi = kv.keys[layer][:end], kv.values[layer][:end]
                else:
                    for own, grads in ((ki, kv.key_grads), (vi, kv.value_grads)):
                        if own.requires_grad:  # else nothing trained lies behind it
                            self.outputs.append(own)
                            self.output_grads.append(grads[layer][start:end])
                    if start:
                        past_k = kv.keys[layer][:start].detach().requires_grad_()  # (start, Hkv, D)
                        past_v = kv.values[layer][:start].detach().requires_grad_()
                        self.leaves.append((layer, piece, past_k, past_v))
                        ki, vi = torch.cat([past_k, ki]), torch.cat([past_v, vi])
            out.append(_attend(qi, ki, vi, window))
        return torch.cat(out)

    def leaf_tensors(self) -> list[torch.Tensor]:
        return [t for _, _, past_k, past_v in self.leaves for t in (past_k, past_v)]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward from `loss` of these rows, the gradients later pieces sent to their own
        keys and values included; then sends theirs on to the earlier pieces."""
        torch.autograd.backward([loss, *self.outputs],
                                [torch.ones_like(loss), *self.output_grads])
        self.send_gradients()

    @torch.no_grad()
    def send_gradients(self) -> None:
        """Adds what backward sent to the earlier pieces' keys and values to their
        ExampleKV (called once the backward that reached the leaves has run)."""
        for layer, piece, past_k, past_v in self.leaves:
            if past_k.grad is not None:
                piece.kv.key_grads[layer][:piece.start] += past_k.grad
            if past_v.grad is not None:
                piece.kv.value_grads[layer][:piece.start] += past_v.grad


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window) -> torch.Tensor:
    """q (n, H, D) the last n positions of k, v (total, Hkv, D) -> (n, H, D)."""
    return attend_one(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                      window).transpose(0, 1)
